//! Cleaning: every rule has a name, a counter and a switch.
//!
//! | rule | kind | what it does |
//! |---|---|---|
//! | `normalize` | rewrite | NFKC (Chinese punctuation kept) and whitespace repair ([`normalize`]) |
//! | `t2s` | rewrite | Traditional → Simplified with OpenCC's dictionaries (only when asked) |
//! | `contact`, `ad`, `call_to_action`, `menu`, `share`, `comment_prompt`, `footer` | line | remove spam lines ([`lines`]) |
//! | `quality_line` | line | documents of the kinds in `quality_kinds` (web pages by default): remove a line the learned model ([`crate::quality`]) scores as spam with probability ≥ `quality_line_threshold` |
//! | `short_line` | line | web pages only: remove short lines (links, labels, headings, sidebars) unless both neighbours are article paragraphs |
//! | `boilerplate` | line | remove lines repeated across many documents of one group (site/file) |
//! | `too_short`, `low_text_share`, `high_symbol_share`, `repeated_lines`, `repeated_ngrams` | document | drop the document ([`filters`]) |
//! | `language` | document | with `languages` set: drop a document whose language ([`whatlang`], ISO 639-3 codes such as `cmn`, `eng`) is reliably detected as none of them |
//! | `quality_doc` | document | documents of the kinds in `quality_kinds`: drop a document whose lines' spam probability, weighted by characters, averages ≥ `quality_doc_threshold` |
//!
//! The corpus pass runs in three stages: rewrites and line rules per document (parallel), then
//! boilerplate across documents, then document filters (parallel). The staged pipeline
//! ([`crate::pipeline`]) runs the same three stages task by task.

pub mod filters;
pub mod lines;
pub mod normalize;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{DataError, Result};
use crate::ingest::{DocKind, RawDoc};
use filters::{DOC_FILTERS, FilterConfig, failing_filter};
use lines::{LINE_RULES, LineRules};

/// Every rule name, in pipeline order.
pub fn all_rules() -> Vec<&'static str> {
    let mut v = vec!["normalize", "t2s"];
    v.extend(LINE_RULES);
    v.push("quality_line");
    v.push("short_line");
    v.push("boilerplate");
    v.extend(DOC_FILTERS);
    v.extend(["language", "quality_doc"]);
    v
}

/// Cleaning settings.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CleanConfig {
    /// Convert Traditional to Simplified (`t2s` rule).
    pub t2s: bool,
    /// Rules switched off, by name.
    pub disabled: BTreeSet<String>,
    pub filters: FilterConfig,
    /// `boilerplate`: a line is boilerplate when it appears in at least this many documents of
    /// its group…
    pub boilerplate_min_docs: usize,
    /// …and in at least this share of them…
    pub boilerplate_min_share: f32,
    /// …and has at least this many characters (shorter lines, like an author's name, repeat
    /// legitimately).
    pub boilerplate_min_chars: usize,
    /// `short_line`: on web pages, lines shorter than this many characters are not article text
    /// unless both neighbours are at least this long.
    pub min_web_line_chars: usize,
    /// `quality_line`: spam probability at or above which a line is removed.
    pub quality_line_threshold: f32,
    /// `quality_doc`: character-weighted mean spam probability at or above which a document is dropped.
    pub quality_doc_threshold: f32,
    /// `language`: languages to keep (ISO 639-3, e.g. `cmn`, `eng`); empty keeps every language.
    pub languages: Vec<String>,
    /// Kinds of document the learned score (`quality_line`, `quality_doc`) judges: crawled pages
    /// by default. Curated text (books, poems) has short title and author lines that look like
    /// page chrome to a model trained on crawls.
    pub quality_kinds: Vec<DocKind>,
}

impl Default for CleanConfig {
    fn default() -> Self {
        CleanConfig {
            t2s: false,
            disabled: BTreeSet::new(),
            filters: FilterConfig::default(),
            boilerplate_min_docs: 2,
            boilerplate_min_share: 0.3,
            boilerplate_min_chars: 6,
            min_web_line_chars: 25,
            quality_line_threshold: 0.65,
            quality_doc_threshold: 0.5,
            languages: Vec::new(),
            quality_kinds: vec![DocKind::Html],
        }
    }
}

impl CleanConfig {
    /// Checks rule names and thresholds.
    pub fn validate(&self) -> Result<()> {
        let known = all_rules();
        if let Some(bad) = self.disabled.iter().find(|r| !known.contains(&r.as_str())) {
            return Err(DataError::Config { field: "disable", reason: format!("unknown rule '{bad}' (known: {})", known.join(", ")) });
        }
        for (field, v) in [
            ("min_text_share", self.filters.min_text_share),
            ("max_symbol_share", self.filters.max_symbol_share),
            ("max_dup_line_share", self.filters.max_dup_line_share),
            ("max_dup_ngram_share", self.filters.max_dup_ngram_share),
            ("boilerplate_min_share", self.boilerplate_min_share),
            ("quality_line_threshold", self.quality_line_threshold),
            ("quality_doc_threshold", self.quality_doc_threshold),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(DataError::Config { field, reason: format!("must be in [0, 1], got {v}") });
            }
        }
        if let Some(bad) = self.languages.iter().find(|l| whatlang::Lang::from_code(l.as_str()).is_none()) {
            return Err(DataError::Config { field: "languages", reason: format!("'{bad}' is not an ISO 639-3 code whatlang knows (e.g. cmn, eng, jpn)") });
        }
        Ok(())
    }

    fn on(&self, rule: &str) -> bool {
        !self.disabled.contains(rule) && (rule != "t2s" || self.t2s)
    }
}

/// What one rule did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RuleCount {
    /// Documents the rule changed (rewrite), removed lines from (line) or dropped (document).
    pub documents: u64,
    /// Lines removed (line rules).
    pub lines: u64,
    /// Characters removed by line rules and document filters; for rewrites, characters before
    /// minus characters after.
    pub chars: i64,
}

/// Counters of a cleaning pass, per rule name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CleanStats {
    pub rules: BTreeMap<String, RuleCount>,
}

impl CleanStats {
    fn bump(&mut self, rule: &str, lines: u64, chars: i64) {
        let c = self.rules.entry(rule.to_string()).or_default();
        c.documents += 1;
        c.lines += lines;
        c.chars += chars;
    }

    pub fn merge(&mut self, o: CleanStats) {
        for (k, v) in o.rules {
            let c = self.rules.entry(k).or_default();
            c.documents += v.documents;
            c.lines += v.lines;
            c.chars += v.chars;
        }
    }
}

/// A document after cleaning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CleanedDoc {
    pub source: String,
    #[serde(skip)]
    pub kind: DocKind,
    #[serde(skip)]
    pub group: String,
    pub text: String,
    /// Rules that changed or removed something, in pipeline order.
    pub rules: Vec<&'static str>,
    /// The document filter that dropped it, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_by: Option<&'static str>,
    /// Lines removed by line rules, with the rule, for inspection.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<RemovedLine>,
}

/// A line a line rule removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemovedLine {
    pub rule: &'static str,
    pub line: String,
}

/// A configured cleaner.
pub struct Cleaner {
    pub config: CleanConfig,
    lines: LineRules,
    opencc: Option<ferrous_opencc::OpenCC>,
    quality: &'static crate::quality::QualityModel,
    languages: Vec<whatlang::Lang>,
}

impl std::fmt::Debug for Cleaner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cleaner").field("config", &self.config).field("t2s", &self.opencc.is_some()).finish()
    }
}

impl Cleaner {
    /// # Errors
    /// An invalid config, or OpenCC's built-in dictionaries failing to load.
    pub fn new(config: CleanConfig) -> Result<Self> {
        config.validate()?;
        let opencc = if config.on("t2s") {
            Some(
                ferrous_opencc::OpenCC::from_config(ferrous_opencc::config::BuiltinConfig::T2s)
                    .map_err(|e| DataError::Config { field: "t2s", reason: format!("OpenCC dictionaries failed to load: {e}") })?,
            )
        } else {
            None
        };
        // Validated above: every code is known.
        let languages = config.languages.iter().filter_map(|l| whatlang::Lang::from_code(l.as_str())).collect();
        Ok(Cleaner { config, lines: LineRules::new(), opencc, quality: crate::quality::QualityModel::shipped(), languages })
    }

    /// Stage 1 for one document: rewrites and line rules.
    pub fn clean_lines(&self, doc: RawDoc, stats: &mut CleanStats) -> CleanedDoc {
        let mut rules = Vec::new();
        let mut text = doc.text;
        if self.config.on("normalize") {
            let n = normalize::normalize(&text);
            if n != text {
                stats.bump("normalize", 0, text.chars().count() as i64 - n.chars().count() as i64);
                rules.push("normalize");
                text = n;
            }
        }
        if let Some(cc) = &self.opencc {
            let s = cc.convert(&text);
            if s != text {
                stats.bump("t2s", 0, 0);
                rules.push("t2s");
                text = s;
            }
        }
        let mut removed: BTreeMap<&'static str, (u64, i64)> = BTreeMap::new();
        let mut removed_lines = Vec::new();
        let learned = self.config.quality_kinds.contains(&doc.kind) && self.config.on("quality_line");
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                match self
                    .lines
                    .classify(line, |r| self.config.on(r))
                    .or_else(|| (learned && self.quality.spam_probability(line) >= self.config.quality_line_threshold).then_some("quality_line"))
                {
                    Some(rule) => {
                        let e = removed.entry(rule).or_default();
                        e.0 += 1;
                        e.1 += line.chars().count() as i64;
                        removed_lines.push(RemovedLine { rule, line: line.to_string() });
                        false
                    }
                    None => true,
                }
            })
            .collect();
        let kept = if doc.kind == DocKind::Html && self.config.on("short_line") {
            let min = self.config.min_web_line_chars;
            let long: Vec<bool> = kept.iter().map(|l| l.chars().count() >= min).collect();
            let mut out = Vec::with_capacity(kept.len());
            for (i, line) in kept.iter().enumerate() {
                let inside_article = i > 0 && i + 1 < kept.len() && long[i - 1] && long[i + 1];
                if long[i] || inside_article {
                    out.push(*line);
                } else {
                    let e = removed.entry("short_line").or_default();
                    e.0 += 1;
                    e.1 += line.chars().count() as i64;
                    removed_lines.push(RemovedLine { rule: "short_line", line: line.to_string() });
                }
            }
            out
        } else {
            kept
        };
        let kept = kept.join("\n");
        for rule in LINE_RULES.iter().chain(&["quality_line", "short_line"]) {
            if let Some((lines, chars)) = removed.get(rule) {
                stats.bump(rule, *lines, *chars);
                rules.push(rule);
            }
        }
        CleanedDoc { source: doc.source, kind: doc.kind, group: doc.group, text: kept, rules, dropped_by: None, removed: removed_lines }
    }

    /// Stage 2: removes lines that repeat across many documents of the same group.
    pub fn remove_boilerplate(&self, docs: &mut [CleanedDoc], stats: &mut CleanStats) {
        if !self.config.on("boilerplate") {
            return;
        }
        let cfg = &self.config;
        // Documents per group, and per (group, line) the number of documents containing it.
        let mut group_docs: HashMap<&str, usize> = HashMap::new();
        let mut line_docs: HashMap<(&str, &str), usize> = HashMap::new();
        // Structured collections (chinese-poetry) have no site chrome: their repeated lines are
        // section headings that belong to the poems.
        let applies = |d: &CleanedDoc| d.kind != DocKind::Poetry;
        for d in docs.iter().filter(|d| applies(d)) {
            *group_docs.entry(&d.group).or_default() += 1;
            let mut seen = std::collections::HashSet::new();
            for line in d.text.lines() {
                if line.chars().count() >= cfg.boilerplate_min_chars && seen.insert(line) {
                    *line_docs.entry((&d.group, line)).or_default() += 1;
                }
            }
        }
        let boiler: std::collections::HashSet<(String, String)> = line_docs
            .into_iter()
            .filter(|((g, _), n)| {
                let total = group_docs[g];
                total >= cfg.boilerplate_min_docs && *n >= cfg.boilerplate_min_docs && *n as f32 >= cfg.boilerplate_min_share * total as f32
            })
            .map(|((g, l), _)| (g.to_string(), l.to_string()))
            .collect();
        if boiler.is_empty() {
            return;
        }
        for d in docs.iter_mut().filter(|d| applies(d)) {
            let group = d.group.clone();
            self.apply_boilerplate(d, |l| boiler.contains(&(group.clone(), l.to_string())), stats);
        }
    }

    /// Removes the lines `is_boilerplate` names from one document (not from chinese-poetry
    /// collections, whose repeated lines are headings).
    pub fn apply_boilerplate(&self, d: &mut CleanedDoc, is_boilerplate: impl Fn(&str) -> bool, stats: &mut CleanStats) {
        if !self.config.on("boilerplate") || d.kind == DocKind::Poetry {
            return;
        }
        let mut gone = Vec::new();
        let mut chars_removed = 0;
        let kept: Vec<&str> = d
            .text
            .lines()
            .filter(|l| {
                let hit = is_boilerplate(l);
                if hit {
                    chars_removed += l.chars().count() as i64;
                    gone.push(RemovedLine { rule: "boilerplate", line: l.to_string() });
                }
                !hit
            })
            .collect();
        if !gone.is_empty() {
            let lines_removed = gone.len() as u64;
            d.text = kept.join("\n");
            d.removed.extend(gone);
            d.rules.push("boilerplate");
            stats.bump("boilerplate", lines_removed, chars_removed);
        }
    }

    /// Stage 3 for one document: the document filters.
    pub fn filter(&self, doc: &mut CleanedDoc, stats: &mut CleanStats) {
        let failing = failing_filter(&doc.text, &self.config.filters, |r| self.config.on(r)).or_else(|| self.learned_filter(doc));
        if let Some(rule) = failing {
            stats.bump(rule, 0, doc.text.chars().count() as i64);
            doc.dropped_by = Some(rule);
            doc.rules.push(rule);
        }
    }

    /// `language` and `quality_doc` for a document that passed the named filters.
    fn learned_filter(&self, doc: &CleanedDoc) -> Option<&'static str> {
        if !self.languages.is_empty() && self.config.on("language") {
            let sample: String = doc.text.chars().take(2000).collect();
            if let Some(info) = whatlang::detect(&sample)
                && info.is_reliable()
                && !self.languages.contains(&info.lang())
            {
                return Some("language");
            }
        }
        if self.config.quality_kinds.contains(&doc.kind) && self.config.on("quality_doc") {
            let (mut weighted, mut chars) = (0f64, 0f64);
            for line in doc.text.lines() {
                let n = line.chars().count() as f64;
                weighted += n * self.quality.spam_probability(line) as f64;
                chars += n;
            }
            if chars > 0.0 && weighted / chars >= self.config.quality_doc_threshold as f64 {
                return Some("quality_doc");
            }
        }
        None
    }

    /// All three stages over a corpus, parallel where the stage allows; the order of documents
    /// is kept. Dropped documents stay in the output with `dropped_by` set.
    pub fn clean_corpus(&self, docs: Vec<RawDoc>) -> (Vec<CleanedDoc>, CleanStats) {
        let (mut cleaned, mut stats) = docs
            .into_par_iter()
            .map(|d| {
                let mut s = CleanStats::default();
                let c = self.clean_lines(d, &mut s);
                (vec![c], s)
            })
            .reduce(
                || (Vec::new(), CleanStats::default()),
                |(mut a, mut sa), (b, sb)| {
                    a.extend(b);
                    sa.merge(sb);
                    (a, sa)
                },
            );
        self.remove_boilerplate(&mut cleaned, &mut stats);
        let filter_stats = cleaned
            .par_iter_mut()
            .map(|d| {
                let mut s = CleanStats::default();
                self.filter(d, &mut s);
                s
            })
            .reduce(CleanStats::default, |mut a, b| {
                a.merge(b);
                a
            });
        stats.merge(filter_stats);
        (cleaned, stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(group: &str, text: &str) -> RawDoc {
        RawDoc { kind: DocKind::Text, source: format!("{group}/x"), group: group.into(), text: text.into() }
    }

    #[test]
    fn boilerplate_needs_repetition_across_documents_of_one_group() {
        let cleaner = Cleaner::new(CleanConfig::default()).unwrap();
        let footer = "本站文章均来自网友投稿整理发布";
        let docs: Vec<RawDoc> = (0..4).map(|i| raw("site", &format!("第{i}篇文章的正文内容，讲述了一个不同的故事。\n{footer}"))).collect();
        let mut other = docs.clone();
        other.push(raw("elsewhere", &format!("另一个站点的正文，与上面无关，内容完全不同。\n{footer}")));
        let (out, stats) = cleaner.clean_corpus(other);
        for d in &out[..4] {
            assert!(!d.text.contains(footer), "{}", d.text);
            assert!(d.rules.contains(&"boilerplate"));
        }
        // Only one document of its group: not boilerplate there.
        assert!(out[4].text.contains(footer));
        assert_eq!(stats.rules["boilerplate"].lines, 4);
        // Negative: with the rule switched off nothing is removed.
        let off = Cleaner::new(CleanConfig { disabled: ["boilerplate".to_string()].into(), ..Default::default() }).unwrap();
        let (out, _) = off.clean_corpus(docs);
        assert!(out.iter().all(|d| d.text.contains(footer)));
    }

    #[test]
    fn short_web_lines_go_unless_inside_the_article() {
        // The learned score would take some of these lines first; this is the rule's own test.
        let cleaner = Cleaner::new(CleanConfig { disabled: ["quality_line".to_string()].into(), ..Default::default() }).unwrap();
        let long1 = "绝句是唐代最常见的诗体之一，每首四句，每句五字的称为五言绝句，每句七字的称为七言绝句。";
        let long2 = "押韵是绝句的另一条规矩，一般在第二句和第四句的末字押韵，首句可押可不押，通常只押平声韵。";
        let text = format!("热门文章\n{long1}\n他这样说。\n{long2}\n宋人点茶小记");
        let mut s = CleanStats::default();
        let html = RawDoc { kind: DocKind::Html, source: "p.html".into(), group: "site".into(), text: text.clone() };
        let d = cleaner.clean_lines(html, &mut s);
        // The short line between two paragraphs stays; the sidebar lines at either end go.
        assert_eq!(d.text, format!("{long1}\n他这样说。\n{long2}"));
        assert_eq!(s.rules["short_line"].lines, 2);
        // Not a web page: short lines are titles and authors, and stay.
        let d = cleaner.clean_lines(raw("g", &text), &mut s);
        assert_eq!(d.text, text);
    }

    #[test]
    fn traditional_to_simplified_only_when_asked() {
        let text = "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。";
        let on = Cleaner::new(CleanConfig { t2s: true, ..Default::default() }).unwrap();
        let mut s = CleanStats::default();
        let d = on.clean_lines(raw("g", text), &mut s);
        assert_eq!(d.text, "床前明月光，疑是地上霜。举头望明月，低头思故乡。");
        assert_eq!(d.rules, ["t2s"]);
        let off = Cleaner::new(CleanConfig::default()).unwrap();
        assert_eq!(off.clean_lines(raw("g", text), &mut s).text, text);
    }

    #[test]
    fn unknown_rule_names_are_refused() {
        let e = Cleaner::new(CleanConfig { disabled: ["spam".to_string()].into(), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("unknown rule 'spam'"), "{e}");
    }
}
