//! Chat templates: Jinja strings rendered with `minijinja` under Hugging Face's conventions, and
//! where each message lands in the rendered text.
//!
//! A template sees what `transformers`' `apply_chat_template` gives it: `messages` (a list of
//! `{role, content}`), `add_generation_prompt`, the special token strings (`bos_token`,
//! `eos_token`, `pad_token`, when the tokenizer has them) and `raise_exception(msg)`. As there,
//! blocks trim the newline after them and strip the spaces before them (`trim_blocks`,
//! `lstrip_blocks`), and strings have Python's methods (`strip`, `startswith`, `split`, …).
//!
//! liandan's own template, [`LIANDAN_TEMPLATE`], writes `<|bos|>` then each turn as
//! `<|role|>content<|end|>`, and `<|assistant|>` as the generation prompt.
//!
//! # Finding the assistant's turns (the loss mask)
//! Two methods, the first that applies:
//! 1. **`{% generation %}` markers**: a template that wraps what the model learns in
//!    `{% generation %}…{% endgeneration %}` (the convention of `return_assistant_tokens_mask`)
//!    says it itself; the markers are rendered as private-use characters, found, and removed.
//! 2. **Incremental prefixes**: for assistant message `i`, render `messages[..i]` with the
//!    generation prompt (`P`) and `messages[..=i]` without (`Q`); `P` must be a prefix of `Q`,
//!    and `Q[len(P)..]` is what the model says. It is cut after the last end-of-turn token in it
//!    (ChatML's `<|im_end|>\n` learns the `<|im_end|>`, not the newline the template adds after
//!    it). A template that rewrites earlier turns as later ones arrive is not prefix-stable and is
//!    refused with a message saying to add the markers.
//!
//! Each message's content is also located in the rendered text (inside the part that message
//! added, skipping places that cut through a special token), so that the tokenizer never turns
//! special-token text typed in a message into a control token.

use std::ops::Range;

use minijinja::{Environment, Error, ErrorKind, Value};

use crate::chat::{Message, Role};

/// liandan's chat template, as a Jinja string (what its own checkpoints carry in
/// `tokenizer_config.json`).
pub const LIANDAN_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}";

/// Where `{% generation %}` opened and closed, in rendered text.
const GEN_OPEN: char = '\u{E000}';
const GEN_CLOSE: char = '\u{E001}';

/// Why a template cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(pub String);

/// A conversation rendered, with byte ranges into `text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    /// Per message, where its content is (`None`: the template changed it beyond finding).
    pub content: Vec<Option<Range<usize>>>,
    /// What the model learns: one range per assistant message.
    pub learn: Vec<Range<usize>>,
}

/// A compiled chat template with the special token strings it is rendered with.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
    bos: Option<String>,
    eos: Option<String>,
    pad: Option<String>,
    /// The template had `{% generation %}` markers.
    markers: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate({} bytes, bos {:?}, eos {:?}, markers {})", self.source.len(), self.bos, self.eos, self.markers)
    }
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {msg}")))
}

/// `{% generation %}` / `{% endgeneration %}` (any whitespace control) as marker output.
fn rewrite_markers(source: &str) -> (String, bool) {
    // The patterns are constant and valid (checked by the tests).
    let open = regex::Regex::new(r"\{%(-?)\s*generation\s*(-?)%\}").expect("constant regex");
    let close = regex::Regex::new(r"\{%(-?)\s*endgeneration\s*(-?)%\}").expect("constant regex");
    if !open.is_match(source) {
        return (source.to_string(), false);
    }
    // An `if true` block keeps the tag's whitespace behaviour (trim_blocks, `-`) while printing.
    let s = open.replace_all(source, format!("{{%$1 if true %}}{{{{ '{GEN_OPEN}' }}}}{{% endif $2%}}"));
    let s = close.replace_all(&s, format!("{{%$1 if true %}}{{{{ '{GEN_CLOSE}' }}}}{{% endif $2%}}"));
    (s.into_owned(), true)
}

impl ChatTemplate {
    /// Compiles `source`; the token strings are what the template's `bos_token`, `eos_token` and
    /// `pad_token` are (absent ones are undefined, as in `transformers`).
    ///
    /// # Errors
    /// A syntax error, with its line.
    pub fn new(source: &str, bos: Option<String>, eos: Option<String>, pad: Option<String>) -> Result<Self, TemplateError> {
        let (rewritten, markers) = rewrite_markers(source);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat_template", rewritten).map_err(|e| TemplateError(describe(&e)))?;
        Ok(ChatTemplate { source: source.to_string(), env, bos, eos, pad, markers })
    }

    /// liandan's own template with its token strings.
    pub fn liandan() -> Self {
        // The constant template compiles (tested).
        Self::new(LIANDAN_TEMPLATE, Some(crate::tokenizer::BOS.into()), Some(crate::tokenizer::END.into()), Some(crate::tokenizer::PAD.into()))
            .expect("liandan's template compiles")
    }

    /// The Jinja source as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The text of `messages` (with the generation prompt when `add_generation_prompt`),
    /// `{% generation %}` markers still in it.
    fn render_raw(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, TemplateError> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                let role = match m.role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                };
                minijinja::context! { role => role, content => m.content.as_str() }
            })
            .collect();
        let ctx = minijinja::context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_deref(),
            eos_token => self.eos.as_deref(),
            pad_token => self.pad.as_deref(),
        };
        // The template was added in `new` under this name.
        let t = self.env.get_template("chat_template").map_err(|e| TemplateError(describe(&e)))?;
        t.render(ctx).map_err(|e| TemplateError(describe(&e)))
    }

    /// The text of `messages`, as `apply_chat_template(messages, tokenize=False)` gives it.
    ///
    /// # Errors
    /// The template failed (an undefined name, `raise_exception`, …).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, TemplateError> {
        let s = self.render_raw(messages, add_generation_prompt)?;
        Ok(if self.markers { s.replace([GEN_OPEN, GEN_CLOSE], "") } else { s })
    }

    /// `messages` rendered (no generation prompt), with where each content and each assistant
    /// turn is. `specials` finds the special tokens in a text (content is never located cutting
    /// through one); `stops` are the end-of-turn strings a learned turn is cut after.
    ///
    /// # Errors
    /// The template failed, is not prefix-stable (and has no markers), or renders an assistant
    /// message as nothing.
    pub fn render_spans(&self, messages: &[Message], specials: &dyn Fn(&str) -> Vec<Range<usize>>, stops: &[&str]) -> Result<Rendered, TemplateError> {
        if messages.iter().any(|m| m.content.contains([GEN_OPEN, GEN_CLOSE])) {
            return Err(TemplateError("a message contains U+E000 or U+E001, which mark generation spans".into()));
        }
        let text = self.render(messages, false)?;
        let special_at = specials(&text);
        // Where each message's part of the text starts: the length of the previous prefix.
        let mut content = Vec::with_capacity(messages.len());
        let mut learn = Vec::new();
        let mut prev_end = 0usize;
        for i in 0..messages.len() {
            let q = if i + 1 == messages.len() { text.clone() } else { self.render(&messages[..=i], false)? };
            if !text.starts_with(&q) {
                if self.markers {
                    // Content stays unlocated; the markers give the learned spans below.
                    content.push(None);
                    continue;
                }
                return Err(TemplateError(format!(
                    "rendering messages 1..={} is not a prefix of rendering all {} (the template rewrites earlier turns); mark the assistant's turns with {{% generation %}}…{{% endgeneration %}}",
                    i + 1,
                    messages.len()
                )));
            }
            let start = prev_end.min(q.len());
            content.push(locate(&text, start..q.len(), &messages[i].content, &special_at));
            if messages[i].role == Role::Assistant && !self.markers {
                let p = self.render(&messages[..i], true)?;
                if !q.starts_with(&p) {
                    return Err(TemplateError(format!(
                        "the generation prompt after message {i} is not how message {} (the assistant's) begins; mark the assistant's turns with {{% generation %}}…{{% endgeneration %}}",
                        i + 1
                    )));
                }
                let mut span = p.len()..q.len();
                if let Some(end) = stops.iter().filter_map(|s| text[span.clone()].rfind(s).map(|at| span.start + at + s.len())).max() {
                    span.end = end;
                }
                if span.is_empty() {
                    return Err(TemplateError(format!("message {} (the assistant's) renders as nothing after the generation prompt", i + 1)));
                }
                learn.push(span);
            }
            prev_end = q.len();
        }
        if self.markers {
            learn = marker_spans(&self.render_raw(messages, false)?);
            let n = messages.iter().filter(|m| m.role == Role::Assistant).count();
            if learn.len() != n || learn.iter().any(|r| r.is_empty()) {
                return Err(TemplateError(format!("{n} assistant messages but {} non-empty {{% generation %}} spans", learn.len())));
            }
        }
        Ok(Rendered { text, content, learn })
    }
}

/// The byte ranges between markers, in the text with the markers removed.
fn marker_spans(raw: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut open = None;
    for c in raw.chars() {
        match c {
            GEN_OPEN => open = Some(pos),
            GEN_CLOSE => {
                if let Some(s) = open.take() {
                    out.push(s..pos);
                }
            }
            _ => pos += c.len_utf8(),
        }
    }
    out
}

/// The last place of `needle` in `text[within]` that does not cut through a special token
/// (`special_at`): it holds each one whole or not at all. The last, because a turn's header
/// (`<|im_start|>user\n`) comes before its content and may spell the same text.
fn locate(text: &str, within: Range<usize>, needle: &str, special_at: &[Range<usize>]) -> Option<Range<usize>> {
    if needle.is_empty() {
        return None;
    }
    let hay = &text[within.clone()];
    let cuts = |r: &Range<usize>| special_at.iter().any(|s| s.start < r.end && r.start < s.end && !(r.start <= s.start && s.end <= r.end));
    hay.rmatch_indices(needle).map(|(at, _)| within.start + at..within.start + at + needle.len()).find(|r| !cuts(r))
}

/// An error's text with the line it points at.
fn describe(e: &Error) -> String {
    match e.line() {
        Some(l) => format!("{} (line {l})", e.detail().unwrap_or(&e.kind().to_string())),
        None => e.detail().map_or_else(|| e.kind().to_string(), str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2's ChatML template (its default-system branch kept, its tools branch left out).
    pub const CHATML: &str = "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + message.content.strip() + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

    fn msgs(v: &[(Role, &str)]) -> Vec<Message> {
        v.iter().map(|(r, c)| Message { role: *r, content: c.to_string() }).collect()
    }

    fn specials(t: &str) -> Vec<Range<usize>> {
        let re = regex::Regex::new(r"<\|[a-z_]+\|>").unwrap();
        re.find_iter(t).map(|m| m.range()).collect()
    }

    #[test]
    fn liandan_template_renders_its_format() {
        let t = ChatTemplate::liandan();
        let m = msgs(&[(Role::User, "问"), (Role::Assistant, "答")]);
        assert_eq!(t.render(&m, false).unwrap(), "<|bos|><|user|>问<|end|><|assistant|>答<|end|>");
        assert_eq!(t.render(&m[..1], true).unwrap(), "<|bos|><|user|>问<|end|><|assistant|>");
        let r = t.render_spans(&m, &specials, &["<|end|>"]).unwrap();
        assert_eq!(&r.text[r.learn[0].clone()], "答<|end|>");
        assert_eq!(r.content.iter().map(|c| &r.text[c.clone().unwrap()]).collect::<Vec<_>>(), ["问", "答"]);
    }

    #[test]
    fn chatml_spans_by_prefixes_stop_at_the_end_of_turn() {
        let t = ChatTemplate::new(CHATML, None, Some("<|im_end|>".into()), None).unwrap();
        let m = msgs(&[(Role::User, "你好"), (Role::Assistant, " 好的 "), (Role::User, "user"), (Role::Assistant, "再见")]);
        let r = t.render_spans(&m, &specials, &["<|im_end|>"]).unwrap();
        assert!(r.text.starts_with("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"), "{}", r.text);
        let learned: Vec<&str> = r.learn.iter().map(|l| &r.text[l.clone()]).collect();
        // `strip()` (Python's, through pycompat) removed the spaces; the newline after <|im_end|> is not learned.
        assert_eq!(learned, ["好的<|im_end|>", "再见<|im_end|>"]);
        // "user" is found as the content, not inside "<|im_start|>user".
        let third = r.content[2].clone().unwrap();
        assert_eq!(&r.text[third.start - 1..third.end + 1], "\nuser<", "{:?}", r.text);
    }

    #[test]
    fn generation_markers_give_the_spans() {
        let src = "{% for m in messages %}{% if m.role == 'assistant' %}A: {% generation %}{{ m.content }}.{% endgeneration %}\n{% else %}U: {{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}";
        let t = ChatTemplate::new(src, None, None, None).unwrap();
        let m = msgs(&[(Role::User, "q"), (Role::Assistant, "a")]);
        let r = t.render_spans(&m, &specials, &[]).unwrap();
        // trim_blocks drops the newline after `{% endgeneration %}`, as Jinja does.
        assert_eq!(r.text, "U: q\nA: a.");
        assert_eq!(&r.text[r.learn[0].clone()], "a.");
    }

    #[test]
    fn bad_templates_are_named() {
        let e = ChatTemplate::new("{% for m in messages %}{{ m.content }", None, None, None).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let t = ChatTemplate::new("{{ raise_exception('Conversation roles must alternate') }}", None, None, None).unwrap();
        let e = t.render(&msgs(&[(Role::User, "q")]), false).unwrap_err().to_string();
        assert!(e.contains("Conversation roles must alternate"), "{e}");
        // Rewrites earlier turns once an answer follows (only the last turn shown): not prefix-stable.
        let t = ChatTemplate::new("{{ messages[-1].content }}", None, None, None).unwrap();
        let e = t.render_spans(&msgs(&[(Role::User, "q"), (Role::Assistant, "a")]), &specials, &[]).unwrap_err().to_string();
        assert!(e.contains("not a prefix") && e.contains("generation"), "{e}");
    }
}
