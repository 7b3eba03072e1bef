//! Bounded memory: the pipeline on inputs several times larger than its memory budget stays
//! under the budget, and its peak does not grow with the input.
//!
//! Accounting: this test binary installs a counting global allocator, so "memory" is every
//! byte the process's heap holds at once (the pipeline, `tokenizers`, the regexes, the thread
//! pools), measured exactly, not sampled. Code, stacks and the page cache are not heap and not
//! counted. Margin: the peak must stay under the budget itself (no allowance), and the run on
//! four times the input may peak at most 25% above the smaller run (the two differ by what the
//! sorted runs and the deduplication bookkeeping hold, which grow with documents, not bytes).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use liandan_data::pipeline::PrepareConfig;
use liandan_data::stream::Limits;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: as above.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new > l.size() {
                let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static A: Counting = Counting;

const BUDGET: u64 = 48 << 20;

/// Records each stage's peak (the peak since the stage began).
struct StagePeaks(std::sync::Mutex<Vec<(String, usize)>>);

impl liandan_data::prepare::Progress for StagePeaks {
    fn begin(&self, _: &str, _: u64) {
        PEAK.store(LIVE.load(Ordering::SeqCst), Ordering::SeqCst);
    }
    fn advance(&self, _: u64) {}
    fn end(&self, stage: &str, _: &str) {
        self.0.lock().unwrap().push((stage.to_string(), PEAK.load(Ordering::SeqCst)));
    }
}

/// Peak heap bytes of one prepare run over `mb` MB of synthetic text.
fn peak_of(name: &str, mb: u64) -> (usize, u64) {
    let d = std::env::temp_dir().join(format!("liandan-mem-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let raw = d.join("raw");
    liandan_data::synth::write_corpus(&raw, mb << 20, 7).unwrap();
    let cfg = PrepareConfig {
        inputs: vec![raw.display().to_string()],
        out: d.join("out"),
        vocab_size: 2048,
        memory_budget: BUDGET,
        task_bytes: 4 << 20,
        limits: Limits { max_line_bytes: 256 << 10, max_doc_bytes: 512 << 10, ..Default::default() },
        ..Default::default()
    };
    let before = LIVE.load(Ordering::SeqCst);
    let stages = StagePeaks(std::sync::Mutex::new(Vec::new()));
    let report = liandan_data::prepare::prepare(&cfg, &stages).unwrap();
    let stages = stages.0.into_inner().unwrap();
    eprintln!("{name}: {}", stages.iter().map(|(s, p)| format!("{s} {:.1} MiB", (p - before) as f64 / (1 << 20) as f64)).collect::<Vec<_>>().join(", "));
    let peak = stages.iter().map(|(_, p)| p - before).max().unwrap_or(0);
    assert!(report.dedup.exact > 0 && report.dedup.near > 0, "the synthetic corpus has duplicates: {:?}", report.dedup);
    assert!(report.tokenizer.sample_rate < 1.0, "the tokenizer was trained on a sample");
    let _ = std::fs::remove_dir_all(&d);
    (peak, report.ingest.bytes)
}

#[test]
fn peak_memory_stays_under_the_budget_and_does_not_grow_with_the_input() {
    let (small, small_bytes) = peak_of("small", 40);
    let (large, large_bytes) = peak_of("large", 160);
    eprintln!(
        "budget {} MiB: {} MB of input peaked at {:.1} MiB, {} MB at {:.1} MiB",
        BUDGET >> 20,
        small_bytes / 1_000_000,
        small as f64 / (1 << 20) as f64,
        large_bytes / 1_000_000,
        large as f64 / (1 << 20) as f64
    );
    assert!(large_bytes > 3 * BUDGET, "the input ({large_bytes} bytes) is several times the budget");
    assert!((large as u64) < BUDGET, "peak {large} bytes over the budget {BUDGET}");
    assert!((small as u64) < BUDGET, "peak {small} bytes over the budget {BUDGET}");
    assert!(large as f64 <= 1.25 * small as f64, "the peak grew with the input: {small} → {large} bytes");
}
