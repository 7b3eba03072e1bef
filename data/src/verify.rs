//! The poem-form verifier: whether a text is a regular-form 绝句 or 律诗 (five or seven
//! characters per line, four or eight lines). Used to derive data and to score model outputs
//! independently of any learned reward model.

use serde::Serialize;

/// The four regular forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PoemForm {
    /// 4 lines × 5 characters.
    WuyanJueju,
    /// 4 lines × 7 characters.
    QiyanJueju,
    /// 8 lines × 5 characters.
    WuyanLushi,
    /// 8 lines × 7 characters.
    QiyanLushi,
}

impl PoemForm {
    pub const ALL: [PoemForm; 4] = [PoemForm::WuyanJueju, PoemForm::QiyanJueju, PoemForm::WuyanLushi, PoemForm::QiyanLushi];

    /// The Chinese name (`五言绝句`, …).
    pub fn name(self) -> &'static str {
        match self {
            PoemForm::WuyanJueju => "五言绝句",
            PoemForm::QiyanJueju => "七言绝句",
            PoemForm::WuyanLushi => "五言律诗",
            PoemForm::QiyanLushi => "七言律诗",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// `(lines, characters per line)`.
    pub fn shape(self) -> (usize, usize) {
        match self {
            PoemForm::WuyanJueju => (4, 5),
            PoemForm::QiyanJueju => (4, 7),
            PoemForm::WuyanLushi => (8, 5),
            PoemForm::QiyanLushi => (8, 7),
        }
    }
}

/// Why a text is not a regular-form poem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub enum FormError {
    #[error("empty")]
    Empty,
    #[error("contains '{0}' (placeholders, brackets, Latin letters and digits are not allowed)")]
    BadChar(char),
    #[error("lines have unequal lengths {0:?}")]
    UnequalLines(Vec<usize>),
    #[error("{lines} lines of {chars} characters is not a regular form")]
    Irregular { lines: usize, chars: usize },
}

const BREAKS: &[char] = &['，', '。', '？', '！', '；', ',', '.', '?', '!', ';'];
const BAD: &[char] = &['□', '(', ')', '（', '）', '[', ']', '【', '】', '《', '》', '〈', '〉', '「', '」', '{', '}'];

/// The poem's lines: split at `，。？！；`, whitespace and newlines removed, empties dropped.
pub fn poem_lines(text: &str) -> Vec<String> {
    text.split(|c| BREAKS.contains(&c) || c == '\n').map(|l| l.chars().filter(|c| !c.is_whitespace()).collect::<String>()).filter(|l| !l.is_empty()).collect()
}

/// The form of `text`, or why it has none.
pub fn poem_form(text: &str) -> Result<PoemForm, FormError> {
    if let Some(c) = text.chars().find(|c| BAD.contains(c) || c.is_ascii_alphanumeric()) {
        return Err(FormError::BadChar(c));
    }
    let lines = poem_lines(text);
    if lines.is_empty() {
        return Err(FormError::Empty);
    }
    let lens: Vec<usize> = lines.iter().map(|l| l.chars().count()).collect();
    if lens.iter().any(|&n| n != lens[0]) {
        return Err(FormError::UnequalLines(lens));
    }
    let shape = (lens.len(), lens[0]);
    PoemForm::ALL.into_iter().find(|f| f.shape() == shape).ok_or(FormError::Irregular { lines: shape.0, chars: shape.1 })
}

/// Whether `text` is a poem of exactly `form`.
pub fn is_form(text: &str, form: PoemForm) -> bool {
    poem_form(text) == Ok(form)
}

/// A graded form score in `[0, 1]`, for rewards: the share of `form`'s lines that `text` has
/// at the right length (its first `n` lines of `k` characters, out of `max(n, lines)`), 0 with
/// a disallowed character, and 1 exactly when [`is_form`] holds.
pub fn form_score(text: &str, form: PoemForm) -> f32 {
    if text.chars().any(|c| BAD.contains(&c) || c.is_ascii_alphanumeric()) {
        return 0.0;
    }
    let lines = poem_lines(text);
    let (n, k) = form.shape();
    let right = lines.iter().take(n).filter(|l| l.chars().count() == k).count();
    right as f32 / n.max(lines.len()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_four_forms() {
        assert_eq!(poem_form("床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"), Ok(PoemForm::WuyanJueju));
        assert_eq!(poem_form("朝辞白帝彩云间，千里江陵一日还。两岸猿声啼不住，轻舟已过万重山。"), Ok(PoemForm::QiyanJueju));
        assert_eq!(poem_form("国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。"), Ok(PoemForm::WuyanLushi));
        assert_eq!(
            poem_form("风急天高猿啸哀，渚清沙白鸟飞回。无边落木萧萧下，不尽长江滚滚来。万里悲秋常作客，百年多病独登台。艰难苦恨繁霜鬓，潦倒新停浊酒杯。"),
            Ok(PoemForm::QiyanLushi)
        );
    }

    #[test]
    fn rejects_what_is_not_regular() {
        assert_eq!(poem_form("床前明月光，疑是地上霜。举头望明月。"), Err(FormError::Irregular { lines: 3, chars: 5 }));
        assert!(matches!(poem_form("床前明月光，疑是地上霜。举头望明月，低头思故乡啊。"), Err(FormError::UnequalLines(_))));
        assert_eq!(poem_form("床前明□光，疑是地上霜。举头望明月，低头思故乡。"), Err(FormError::BadChar('□')));
        assert_eq!(poem_form("床前明月光，疑是地上霜。举头望明月，低头思故乡2。"), Err(FormError::BadChar('2')));
        assert_eq!(poem_form(""), Err(FormError::Empty));
        assert!(is_form("床前明月光，疑是地上霜。举头望明月，低头思故乡。", PoemForm::WuyanJueju));
        assert!(!is_form("床前明月光，疑是地上霜。举头望明月，低头思故乡。", PoemForm::QiyanJueju));
    }

    #[test]
    fn form_score_grades_and_is_one_exactly_on_the_form() {
        let f = PoemForm::WuyanJueju;
        assert_eq!(form_score("床前明月光，疑是地上霜。举头望明月，低头思故乡。", f), 1.0);
        assert_eq!(form_score("床前明月光，疑是地上霜。举头望明月。", f), 0.75);
        assert_eq!(form_score("床前明月光，疑是地上霜。举头望明月，低头思故乡。床前明月光，", f), 0.8);
        assert_eq!(form_score("床前明月光，疑是地上霜啊。", f), 0.25);
        assert_eq!(form_score("床前明月光2，", f), 0.0);
        assert_eq!(form_score("", f), 0.0);
    }
}
