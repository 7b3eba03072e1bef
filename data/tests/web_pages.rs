//! The cleaner on the hand-made noisy pages of `data/demo/web/`: for every page, each article
//! paragraph listed in `EXPECTED.md` survives as one whole, unchanged line, and no spam string
//! listed there occurs in any line of the cleaned page.

use std::collections::BTreeMap;
use std::path::PathBuf;

use liandan_data::clean::{CleanConfig, Cleaner};
use liandan_data::ingest::{expand_inputs, read_file, IngestOptions, RawDoc};

#[derive(Default, Debug)]
struct Expect {
    keep: Vec<String>,
    drop: Vec<String>,
    keep_simplified: Vec<String>,
    drop_simplified: Vec<String>,
}

fn web_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/web")
}

fn expectations() -> BTreeMap<String, Expect> {
    let text = std::fs::read_to_string(web_dir().join("EXPECTED.md")).expect("EXPECTED.md");
    let mut out: BTreeMap<String, Expect> = BTreeMap::new();
    let (mut page, mut section) = (String::new(), String::new());
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("## ") {
            page = p.trim().to_string();
            out.entry(page.clone()).or_default();
        } else if let Some(s) = line.strip_prefix("### ") {
            section = s.trim().to_string();
        } else if let (Some(item), false) = (line.strip_prefix("- "), page.is_empty()) {
            let e = out.get_mut(&page).unwrap();
            let item = item.to_string();
            match section.as_str() {
                "keep" => e.keep.push(item),
                "drop" => e.drop.push(item),
                "keep-simplified" => e.keep_simplified.push(item),
                "drop-simplified" => e.drop_simplified.push(item),
                _ => {}
            }
        }
    }
    out.retain(|k, _| k.ends_with(".html"));
    out
}

fn clean_pages(t2s: bool) -> BTreeMap<String, String> {
    let files = expand_inputs(&[web_dir().display().to_string()]).unwrap();
    let mut docs: Vec<RawDoc> = Vec::new();
    for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "html")) {
        docs.extend(read_file(f, &IngestOptions::default()).unwrap().0);
    }
    let cleaner = Cleaner::new(CleanConfig { t2s, ..Default::default() }).unwrap();
    let (cleaned, _) = cleaner.clean_corpus(docs);
    cleaned
        .into_iter()
        .map(|d| {
            let name = PathBuf::from(&d.source).file_name().unwrap().to_string_lossy().into_owned();
            assert_eq!(d.dropped_by, None, "{name} was dropped whole");
            (name, d.text)
        })
        .collect()
}

fn check(cleaned: &BTreeMap<String, String>, page: &str, keep: &[String], drop: &[String]) -> Vec<String> {
    let text = &cleaned[page];
    let lines: Vec<&str> = text.lines().collect();
    let mut failures = Vec::new();
    for k in keep {
        if !lines.contains(&k.as_str()) {
            failures.push(format!("{page}: article paragraph lost or altered: {k}"));
        }
    }
    for d in drop {
        if let Some(l) = lines.iter().find(|l| l.contains(d.as_str())) {
            failures.push(format!("{page}: spam '{d}' survived in line: {l}"));
        }
    }
    failures
}

#[test]
fn articles_survive_and_spam_does_not() {
    let exp = expectations();
    assert_eq!(exp.len(), 5, "pages in EXPECTED.md");
    let plain = clean_pages(false);
    let simplified = clean_pages(true);
    let mut failures = Vec::new();
    let (mut kept, mut dropped) = (0, 0);
    for (page, e) in &exp {
        failures.extend(check(&plain, page, &e.keep, &e.drop));
        kept += e.keep.len();
        dropped += e.drop.len();
        if !e.keep_simplified.is_empty() {
            failures.extend(check(&simplified, page, &e.keep_simplified, &e.drop_simplified));
        }
    }
    eprintln!("checked {kept} article paragraphs and {dropped} spam strings over {} pages", exp.len());
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}
