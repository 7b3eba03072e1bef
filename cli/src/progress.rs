//! Progress reporting: a live bar on a terminal, plain log lines otherwise (CI, pipes).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A step counter that draws a bar on a terminal and prints every `log_every` steps elsewhere.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    log_every: u64,
}

impl Progress {
    pub fn new(total: u64, start: u64, label: &str) -> Self {
        let log_every = (total / 10).max(1);
        if !std::io::stderr().is_terminal() {
            return Progress { bar: None, log_every };
        }
        let bar = ProgressBar::new(total);
        // The template is a constant known to parse.
        let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} (eta {eta})").expect("static progress template parses").progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        bar.set_position(start);
        Progress { bar: Some(bar), log_every }
    }

    /// Reports that `step` (1-based count of steps done) finished with `msg`.
    pub fn step(&self, step: u64, total: u64, msg: &str) {
        match &self.bar {
            Some(b) => {
                b.set_position(step);
                b.set_message(msg.to_string());
            }
            None => {
                if step.is_multiple_of(self.log_every) || step == total || step == 1 {
                    eprintln!("step {step}/{total} {msg}");
                }
            }
        }
    }

    /// Prints a line without tearing the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
