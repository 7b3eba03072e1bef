//! The cleaner on hand-made noisy pages: the demo's (`data/demo/web/`) and pages of other kinds
//! that the quality model never saw (`data/tests/web/`: a shop, a forum, a Q&A site, a repost, a
//! Traditional-character blog). For every page, each article paragraph listed in `EXPECTED.md`
//! survives as one whole, unchanged line, and no spam string listed there occurs in any line of
//! the cleaned page.

use std::collections::BTreeMap;
use std::path::PathBuf;

use liandan_data::clean::{CleanConfig, Cleaner};
use liandan_data::ingest::{IngestOptions, RawDoc, expand_inputs, read_file};

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

fn new_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/web")
}

fn expectations() -> BTreeMap<String, Expect> {
    expectations_in(&web_dir())
}

fn expectations_in(dir: &std::path::Path) -> BTreeMap<String, Expect> {
    let text = std::fs::read_to_string(dir.join("EXPECTED.md")).expect("EXPECTED.md");
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
    clean_pages_in(&web_dir(), t2s)
}

fn clean_pages_in(dir: &std::path::Path, t2s: bool) -> BTreeMap<String, String> {
    let files = expand_inputs(&[dir.display().to_string()]).unwrap();
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

#[test]
fn new_kinds_of_pages_are_cleaned_line_by_line() {
    let exp = expectations_in(&new_dir());
    assert_eq!(exp.len(), 5, "pages in tests/web/EXPECTED.md");
    let cc = ferrous_opencc::OpenCC::from_config(ferrous_opencc::config::BuiltinConfig::T2s).unwrap();
    let plain = clean_pages_in(&new_dir(), false);
    let simplified = clean_pages_in(&new_dir(), true);
    let mut failures = Vec::new();
    let (mut kept, mut dropped) = (0, 0);
    for (page, e) in &exp {
        failures.extend(check(&plain, page, &e.keep, &e.drop));
        let conv = |v: &[String]| v.iter().map(|l| cc.convert(l)).collect::<Vec<_>>();
        failures.extend(check(&simplified, page, &conv(&e.keep), &conv(&e.drop)));
        kept += e.keep.len();
        dropped += e.drop.len();
    }
    eprintln!("checked {kept} article paragraphs and {dropped} spam strings over {} new pages", exp.len());
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// The new pages are held out: none of their lines is among the quality model's labelled lines.
#[test]
fn new_pages_are_not_in_the_quality_training_lines() {
    let labelled: std::collections::HashSet<String> =
        liandan_data::quality::parse_labelled(liandan_data::quality::SHIPPED, "lines.tsv").unwrap().into_iter().map(|(l, _)| l).collect();
    let (mut n, mut overlap) = (0, Vec::new());
    for f in std::fs::read_dir(new_dir()).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "html") {
            let text = liandan_data::html::html_to_text(&std::fs::read_to_string(&p).unwrap());
            for line in text.lines() {
                n += 1;
                if labelled.contains(line.trim()) {
                    overlap.push(format!("{}: {line}", p.display()));
                }
            }
        }
    }
    assert!(overlap.is_empty(), "training lines on the test pages:\n{}", overlap.join("\n"));
    assert!(n >= 80, "{n} lines checked");
}

/// Without the learned score, some of the new pages' spam gets through: the model is what
/// catches it (the rules alone are not enough for these pages).
#[test]
fn the_learned_score_catches_what_the_rules_miss() {
    let exp = expectations_in(&new_dir());
    let files = expand_inputs(&[new_dir().display().to_string()]).unwrap();
    let mut docs: Vec<RawDoc> = Vec::new();
    for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "html")) {
        docs.extend(read_file(f, &IngestOptions::default()).unwrap().0);
    }
    let off = Cleaner::new(CleanConfig { disabled: ["quality_line".to_string(), "quality_doc".to_string()].into(), ..Default::default() }).unwrap();
    let (cleaned, _) = off.clean_corpus(docs.clone());
    let rules_only: BTreeMap<String, String> = cleaned.into_iter().map(|d| (PathBuf::from(&d.source).file_name().unwrap().to_string_lossy().into_owned(), d.text)).collect();
    let missed: usize = exp.iter().map(|(page, e)| check(&rules_only, page, &[], &e.drop).len()).sum();
    let on = Cleaner::new(CleanConfig::default()).unwrap();
    let (cleaned, stats) = on.clean_corpus(docs);
    eprintln!("rules alone let {missed} spam strings through; the learned score removed {} lines", stats.rules.get("quality_line").map_or(0, |c| c.lines));
    assert!(missed >= 5, "rules alone missed only {missed}: the pages would not test the model");
    assert!(cleaned.iter().all(|d| d.dropped_by.is_none()));
}
