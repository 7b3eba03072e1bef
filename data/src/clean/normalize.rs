//! Unicode NFKC normalisation and whitespace repair.
//!
//! NFKC folds full-width Latin letters and digits (`Ａ１` → `A1`), ligatures and compatibility
//! forms. It would also turn Chinese full-width punctuation (`，：；？！（）`) and `…` into
//! their ASCII look-alikes, which is wrong for Chinese text (and for the poem verifier, which
//! splits at `，。？！；`), so those characters are kept as they are.

use unicode_normalization::UnicodeNormalization;

/// Full-width punctuation that Chinese text uses as is.
const KEEP: &[char] = &['，', '：', '；', '？', '！', '（', '）', '…', '～'];

/// NFKC except for [`KEEP`], then whitespace repair:
/// - control and zero-width characters removed (`\n` kept),
/// - any other whitespace (tabs, U+3000, NBSP) becomes a space, runs of spaces collapse,
/// - a space between two CJK characters is removed (`春 眠 不 觉 晓` → `春眠不觉晓`),
/// - lines are trimmed and empty lines dropped.
pub fn normalize(text: &str) -> String {
    let mut nfkc = String::with_capacity(text.len());
    let mut run = String::new();
    for ch in text.chars() {
        if KEEP.contains(&ch) {
            nfkc.extend(run.nfkc());
            run.clear();
            nfkc.push(ch);
        } else {
            run.push(ch);
        }
    }
    nfkc.extend(run.nfkc());

    let mut lines = Vec::new();
    for line in nfkc.split('\n') {
        let mut out: Vec<char> = Vec::with_capacity(line.len());
        for ch in line.chars() {
            if is_zero_width(ch) || (ch.is_control() && ch != '\t') {
                continue;
            }
            let ch = if ch.is_whitespace() { ' ' } else { ch };
            if ch == ' ' && (out.is_empty() || out.last() == Some(&' ')) {
                continue;
            }
            out.push(ch);
        }
        // Remove spaces between two CJK characters.
        let mut fixed = String::with_capacity(out.len() * 3);
        for i in 0..out.len() {
            if out[i] == ' ' && i > 0 && i + 1 < out.len() && is_cjk(out[i - 1]) && is_cjk(out[i + 1]) {
                continue;
            }
            fixed.push(out[i]);
        }
        let t = fixed.trim();
        if !t.is_empty() {
            lines.push(t.to_string());
        }
    }
    lines.join("\n")
}

fn is_zero_width(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}')
}

/// CJK ideographs (BMP and extensions), kana, hangul and CJK/full-width punctuation.
pub fn is_cjk(c: char) -> bool {
    is_cjk_ideograph(c) || matches!(c, '\u{3000}'..='\u{303F}' | '\u{3040}'..='\u{30FF}' | '\u{AC00}'..='\u{D7AF}' | '\u{FF00}'..='\u{FFEF}' | '…' | '“' | '”' | '‘' | '’' | '—')
}

/// CJK unified ideographs, including the extensions and compatibility blocks.
pub fn is_cjk_ideograph(c: char) -> bool {
    matches!(c, '\u{3400}'..='\u{4DBF}' | '\u{4E00}'..='\u{9FFF}' | '\u{F900}'..='\u{FAFF}' | '\u{20000}'..='\u{3134F}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_fullwidth_letters_but_keeps_chinese_punctuation() {
        assert_eq!(normalize("ＧＰＴ－４　Ｐｌｕｓ，好！"), "GPT-4 Plus，好！");
        assert_eq!(normalize("他说：“可以。”……"), "他说：“可以。”……");
    }

    #[test]
    fn repairs_whitespace() {
        assert_eq!(normalize("  春 眠 不 觉 晓 \t\n\n\u{200B}处处  闻啼鸟\r\n"), "春眠不觉晓\n处处闻啼鸟");
        assert_eq!(normalize("hello   world 你好 abc"), "hello world 你好 abc");
    }

    #[test]
    fn clean_text_is_unchanged() {
        let s = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。";
        assert_eq!(normalize(s), s);
    }
}
