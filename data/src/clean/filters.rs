//! Document filters: a document that fails one is dropped whole (after the line rules ran).

use std::collections::HashSet;

use super::normalize::is_cjk_ideograph;

/// Names of the document filters, in the order they are tried.
pub const DOC_FILTERS: &[&str] = &["too_short", "low_text_share", "high_symbol_share", "repeated_lines", "repeated_ngrams"];

/// Thresholds of the document filters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// `too_short`: fewer non-space characters than this.
    pub min_chars: usize,
    /// `low_text_share`: CJK ideographs, letters and digits make up less than this share of the
    /// non-space characters.
    pub min_text_share: f32,
    /// `high_symbol_share`: symbols (`#$%&*+<=>@^_|~` and Unicode symbol blocks) exceed this share.
    pub max_symbol_share: f32,
    /// `repeated_lines`: more than this share of lines repeat an earlier line.
    pub max_dup_line_share: f32,
    /// `repeated_ngrams`: more than this share of character 10-grams repeat an earlier one.
    pub max_dup_ngram_share: f32,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig { min_chars: 12, min_text_share: 0.5, max_symbol_share: 0.15, max_dup_line_share: 0.3, max_dup_ngram_share: 0.5 }
    }
}

/// N of the repeated-n-gram filter.
const NGRAM: usize = 10;

/// The first filter that drops `text`, if any.
pub fn failing_filter(text: &str, cfg: &FilterConfig, enabled: impl Fn(&str) -> bool) -> Option<&'static str> {
    let chars: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
    if enabled("too_short") && chars.len() < cfg.min_chars {
        return Some("too_short");
    }
    if chars.is_empty() {
        return Some("too_short");
    }
    let n = chars.len() as f32;
    if enabled("low_text_share") {
        let text_chars = chars.iter().filter(|c| is_cjk_ideograph(**c) || c.is_alphanumeric()).count() as f32;
        if text_chars / n < cfg.min_text_share {
            return Some("low_text_share");
        }
    }
    if enabled("high_symbol_share") {
        let symbols = chars.iter().filter(|c| is_symbol(**c)).count() as f32;
        if symbols / n > cfg.max_symbol_share {
            return Some("high_symbol_share");
        }
    }
    if enabled("repeated_lines") {
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if lines.len() >= 3 {
            let mut seen = HashSet::new();
            let dups = lines.iter().filter(|l| !seen.insert(**l)).count() as f32;
            if dups / lines.len() as f32 > cfg.max_dup_line_share {
                return Some("repeated_lines");
            }
        }
    }
    if enabled("repeated_ngrams") && chars.len() >= 2 * NGRAM {
        let mut seen = HashSet::new();
        let total = chars.len() - NGRAM + 1;
        let dups = chars.windows(NGRAM).filter(|w| !seen.insert(*w)).count() as f32;
        if dups / total as f32 > cfg.max_dup_ngram_share {
            return Some("repeated_ngrams");
        }
    }
    None
}

fn is_symbol(c: char) -> bool {
    matches!(c, '#' | '$' | '%' | '&' | '*' | '+' | '<' | '=' | '>' | '@' | '^' | '_' | '|' | '~' | '`' | '\\' | '{' | '}')
        || matches!(c, '\u{2190}'..='\u{21FF}' | '\u{2200}'..='\u{22FF}' | '\u{2300}'..='\u{23FF}' | '\u{2500}'..='\u{27BF}' | '\u{2B00}'..='\u{2BFF}' | '\u{1F000}'..='\u{1FAFF}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(text: &str) -> Option<&'static str> {
        failing_filter(text, &FilterConfig::default(), |_| true)
    }

    #[test]
    fn each_filter_has_a_positive_and_a_negative_case() {
        let poem = "静夜思\n李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。";
        assert_eq!(f(poem), None);
        // 诗经 repeats phrases by design and must survive.
        assert_eq!(f("采葛\n彼采葛兮，一日不见，如三月兮！\n彼采萧兮，一日不见，如三秋兮！\n彼采艾兮，一日不见，如三岁兮！"), None);
        assert_eq!(f("好文章"), Some("too_short"));
        assert_eq!(f("—— …… —— …… —— …… 《》《》《》（）（）（）"), Some("low_text_share"));
        assert_eq!(f("★★★ 这家店的茶叶很好喝，推荐给大家 ★★★ 非常满意 ★★"), Some("high_symbol_share"));
        assert_eq!(f("今天天气不错啊朋友们\n今天天气不错啊朋友们\n今天天气不错啊朋友们\n今天天气不错啊朋友们"), Some("repeated_lines"));
        assert_eq!(f("哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈"), Some("repeated_ngrams"));
    }

    #[test]
    fn switched_off_filters_do_not_fire() {
        assert_eq!(failing_filter("好文章", &FilterConfig::default(), |n| n != "too_short"), None);
    }
}
