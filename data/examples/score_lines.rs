//! Prints the learned spam probability of every line of the given files (HTML pages as the
//! cleaner sees them), for choosing `quality_line_threshold`:
//! `cargo run --release -p liandan-data --example score_lines -- page.html …`
fn main() {
    let model = liandan_data::quality::QualityModel::shipped();
    for path in std::env::args().skip(1) {
        let raw = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let text = if path.ends_with(".html") { liandan_data::html::html_to_text(&raw) } else { raw };
        println!("== {path}");
        for line in text.lines() {
            println!("{:.3}  {line}", model.spam_probability(line));
        }
    }
}
