//! Supervised (SFT) and preference data: reading, validation and tokenization with the chat
//! template.
//!
//! Input lines (JSONL):
//! - SFT: `{"prompt": …, "response": …}` or `{"messages": [{"role": "system"|"user"|"assistant",
//!   "content": …}, …]}` (the last message is the assistant's);
//! - preference: `{"prompt": …, "chosen": …, "rejected": …, "label_source": "human"|"rule"}`
//!   (`label_source` defaults to `rule`: comparisons derived by rule are never passed off as
//!   human judgements).
//!
//! Other fields (`task`, `rule`, `form`, `reference`) are kept as metadata. Every error names the
//! file, the line and the field.
//!
//! Conversations are formatted by the tokenizer's chat template ([`crate::template`]); liandan's
//! own writes `<|bos|>` then each turn as `<|role|>content<|end|>`. The loss mask is 1 on the
//! assistant's content tokens and its end of turn (so the model learns to stop), 0 elsewhere.

use std::path::Path;

use serde::Serialize;

use crate::error::{DataError, Result};
use crate::tokenizer::ChatTokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// One SFT example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SftExample {
    pub messages: Vec<Message>,
    /// `task` field, when present (e.g. `poem`, `next_line`).
    pub task: Option<String>,
    /// `file:line`.
    pub source: String,
}

/// Who judged a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelSource {
    Human,
    Rule,
}

/// One comparison of two answers to a prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub label_source: LabelSource,
    pub task: Option<String>,
    pub source: String,
}

/// Largest SFT or preference file read (examples are held in memory once read).
pub const MAX_EXAMPLES_BYTES: u64 = 4 << 30;

fn lines(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, serde_json::Value>)>> {
    let mut out = Vec::new();
    crate::files::for_each_line(path, MAX_EXAMPLES_BYTES, |n, line| {
        if line.trim().is_empty() {
            return Ok(());
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| DataError::line(path, n, format!("not valid JSON: {e}")))?;
        match v {
            serde_json::Value::Object(m) => out.push((n, m)),
            _ => return Err(DataError::line(path, n, "expected a JSON object")),
        }
        Ok(())
    })?;
    if out.is_empty() {
        return Err(DataError::file(path, "has no examples"));
    }
    Ok(out)
}

/// A non-empty string field.
fn text_field(m: &serde_json::Map<String, serde_json::Value>, key: &str, path: &Path, line: usize) -> Result<String> {
    match m.get(key) {
        None => Err(DataError::line(path, line, format!("field '{key}' is missing"))),
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(serde_json::Value::String(_)) => Err(DataError::line(path, line, format!("field '{key}' is empty"))),
        Some(_) => Err(DataError::line(path, line, format!("field '{key}' must be a string"))),
    }
}

fn optional(m: &serde_json::Map<String, serde_json::Value>, key: &str) -> Option<String> {
    m.get(key).and_then(|v| v.as_str()).map(str::to_string)
}

/// Reads and validates an SFT file.
///
/// # Errors
/// The first bad line, as `file:line: field …`.
pub fn read_sft(path: &Path) -> Result<Vec<SftExample>> {
    let mut out = Vec::new();
    for (n, m) in lines(path)? {
        let messages = if let Some(msgs) = m.get("messages") {
            let arr = msgs.as_array().ok_or_else(|| DataError::line(path, n, "field 'messages' must be an array"))?;
            let mut v = Vec::new();
            for (i, msg) in arr.iter().enumerate() {
                let mm = msg.as_object().ok_or_else(|| DataError::line(path, n, format!("messages[{i}] must be an object")))?;
                let role = match mm.get("role").and_then(|r| r.as_str()) {
                    Some("system") => Role::System,
                    Some("user") => Role::User,
                    Some("assistant") => Role::Assistant,
                    other => return Err(DataError::line(path, n, format!("messages[{i}].role must be system, user or assistant, got {other:?}"))),
                };
                let content = text_field(mm, "content", path, n).map_err(|_| DataError::line(path, n, format!("messages[{i}].content must be a non-empty string")))?;
                v.push(Message { role, content });
            }
            match v.last() {
                None => return Err(DataError::line(path, n, "field 'messages' is empty")),
                Some(last) if last.role != Role::Assistant => return Err(DataError::line(path, n, "the last message must be the assistant's (it is what the model learns)")),
                _ => {}
            }
            if !v.iter().any(|m| m.role == Role::User) {
                return Err(DataError::line(path, n, "field 'messages' has no user turn"));
            }
            v
        } else {
            let prompt = text_field(&m, "prompt", path, n)?;
            let response = text_field(&m, "response", path, n)?;
            vec![Message { role: Role::User, content: prompt }, Message { role: Role::Assistant, content: response }]
        };
        out.push(SftExample { messages, task: optional(&m, "task"), source: format!("{}:{n}", path.display()) });
    }
    Ok(out)
}

/// Reads and validates a preference file.
///
/// # Errors
/// The first bad line: a missing field, an unknown `label_source`, chosen equal to rejected.
pub fn read_preferences(path: &Path) -> Result<Vec<PreferencePair>> {
    let mut out = Vec::new();
    for (n, m) in lines(path)? {
        let prompt = text_field(&m, "prompt", path, n)?;
        let chosen = text_field(&m, "chosen", path, n)?;
        let rejected = text_field(&m, "rejected", path, n)?;
        if chosen.trim() == rejected.trim() {
            return Err(DataError::line(path, n, "fields 'chosen' and 'rejected' are the same answer: the pair teaches nothing"));
        }
        let label_source = match m.get("label_source").and_then(|v| v.as_str()) {
            None | Some("rule") => LabelSource::Rule,
            Some("human") => LabelSource::Human,
            Some(other) => return Err(DataError::line(path, n, format!("field 'label_source' must be human or rule, got '{other}'"))),
        };
        out.push(PreferencePair { prompt, chosen, rejected, label_source, task: optional(&m, "task"), source: format!("{}:{n}", path.display()) });
    }
    Ok(out)
}

/// Token ids of a conversation and the loss mask (1 = an assistant token the model learns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedChat {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
}

/// Tokenizes `messages` with the tokenizer's chat template; the mask is 1 on what each
/// assistant message renders as (its content and end of turn), found as
/// [`crate::template`] describes.
///
/// # Errors
/// The template fails on these messages (see [`crate::template::ChatTemplate::render_spans`]).
pub fn tokenize_chat(tk: &ChatTokenizer, messages: &[Message]) -> Result<TokenizedChat> {
    let stops: Vec<String> = tk.stop_tokens().iter().filter_map(|&i| tk.inner().id_to_token(i)).collect();
    let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
    let r = tk.template().render_spans(messages, &|t| tk.special_ranges(t), &stops).map_err(template_error)?;
    let protected: Vec<std::ops::Range<usize>> = r.content.iter().flatten().cloned().collect();
    let (ids, offsets) = tk.encode_rendered(&r.text, &protected)?;
    let mask = offsets.iter().map(|o| u8::from(r.learn.iter().any(|l| o.start < l.end && l.start < o.end))).collect();
    Ok(TokenizedChat { ids, mask })
}

/// The prompt of a conversation ready for generation: the template's rendering of `messages`
/// with its generation prompt (for liandan's, up to and including the `<|assistant|>` that
/// opens the reply).
///
/// # Errors
/// The template fails on these messages.
pub fn prompt_ids(tk: &ChatTokenizer, messages: &[Message]) -> Result<Vec<u32>> {
    let text = tk.template().render(messages, true).map_err(template_error)?;
    // Contents are located in the rendering without the prompt; it is a prefix of this one for
    // every template that can be used (checked at submit), else they are not protected.
    let base = tk.template().render_spans(messages, &|t| tk.special_ranges(t), &[]).map_err(template_error)?;
    let protected: Vec<std::ops::Range<usize>> = if text.starts_with(&base.text) { base.content.iter().flatten().cloned().collect() } else { Vec::new() };
    Ok(tk.encode_rendered(&text, &protected)?.0)
}

fn template_error(e: crate::template::TemplateError) -> DataError {
    DataError::Config { field: "chat_template", reason: e.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::small_tokenizer;

    fn file(name: &str, body: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("liandan-chat-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn reads_both_sft_shapes_and_names_bad_lines() {
        let p = file(
            "ok.jsonl",
            "{\"prompt\":\"问\",\"response\":\"答\",\"task\":\"t\"}\n{\"messages\":[{\"role\":\"system\",\"content\":\"s\"},{\"role\":\"user\",\"content\":\"u\"},{\"role\":\"assistant\",\"content\":\"a\"}]}\n",
        );
        let ex = read_sft(&p).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].messages[1], Message { role: Role::Assistant, content: "答".into() });
        assert_eq!(ex[1].messages.len(), 3);

        let p = file("bad.jsonl", "{\"prompt\":\"问\",\"response\":\"答\"}\n{\"prompt\":\"只有问题\"}\n");
        let e = read_sft(&p).unwrap_err().to_string();
        assert!(e.ends_with("bad.jsonl:2: field 'response' is missing"), "{e}");
        let p = file("bad2.jsonl", "{\"messages\":[{\"role\":\"user\",\"content\":\"u\"},{\"role\":\"bot\",\"content\":\"a\"}]}\n");
        let e = read_sft(&p).unwrap_err().to_string();
        assert!(e.contains("bad2.jsonl:1: messages[1].role"), "{e}");
        let p = file("bad3.jsonl", "{\"prompt\":\"问\",\"response\":\"  \"}\n");
        assert!(read_sft(&p).unwrap_err().to_string().contains("field 'response' is empty"));
    }

    #[test]
    fn preference_pairs_are_validated_and_labelled() {
        let p = file("pref.jsonl", "{\"prompt\":\"p\",\"chosen\":\"好\",\"rejected\":\"坏\"}\n{\"prompt\":\"p\",\"chosen\":\"a\",\"rejected\":\"b\",\"label_source\":\"human\"}\n");
        let v = read_preferences(&p).unwrap();
        assert_eq!(v[0].label_source, LabelSource::Rule);
        assert_eq!(v[1].label_source, LabelSource::Human);
        let p = file("same.jsonl", "{\"prompt\":\"p\",\"chosen\":\"一样\",\"rejected\":\"一样\"}\n");
        let e = read_preferences(&p).unwrap_err().to_string();
        assert!(e.contains("same.jsonl:1: fields 'chosen' and 'rejected' are the same"), "{e}");
    }

    #[test]
    fn template_masks_exactly_the_assistant_tokens() {
        let tk = small_tokenizer();
        let msgs = vec![Message { role: Role::User, content: "床前明月光".into() }, Message { role: Role::Assistant, content: "疑是地上霜".into() }];
        let t = tokenize_chat(&tk, &msgs).unwrap();
        assert_eq!(t.ids.len(), t.mask.len());
        assert_eq!(tk.decode(&t.ids).unwrap(), "<|bos|><|user|>床前明月光<|end|><|assistant|>疑是地上霜<|end|>");
        let learned: Vec<u32> = t.ids.iter().zip(&t.mask).filter(|(_, m)| **m == 1).map(|(i, _)| *i).collect();
        assert_eq!(tk.decode(&learned).unwrap(), "疑是地上霜<|end|>");
        let p = prompt_ids(&tk, &msgs[..1]).unwrap();
        assert_eq!(tk.decode(&p).unwrap(), "<|bos|><|user|>床前明月光<|end|><|assistant|>");
    }

    /// liandan's template as code, as it was before templates were Jinja: the reference the
    /// rendered template must reproduce id for id.
    fn reference(tk: &ChatTokenizer, messages: &[Message]) -> TokenizedChat {
        let id = |t: &str| tk.inner().token_to_id(t).unwrap();
        let mut ids = vec![id(crate::tokenizer::BOS)];
        let mut mask = vec![0u8];
        for m in messages {
            let (role, learn) = match m.role {
                Role::System => (id(crate::tokenizer::SYSTEM), 0),
                Role::User => (id(crate::tokenizer::USER), 0),
                Role::Assistant => (id(crate::tokenizer::ASSISTANT), 1),
            };
            ids.push(role);
            mask.push(0);
            let body = tk.encode(&m.content).unwrap();
            mask.extend(std::iter::repeat_n(learn, body.len() + 1));
            ids.extend(body);
            ids.push(tk.special.end);
        }
        TokenizedChat { ids, mask }
    }

    #[test]
    fn jinja_template_gives_the_ids_and_mask_of_the_code_template_on_the_demo_data() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("demo");
        let examples = read_sft(&root.join("sft.jsonl")).unwrap();
        let text: Vec<String> = examples.iter().flat_map(|e| e.messages.iter().map(|m| m.content.clone())).collect();
        let tk = ChatTokenizer::train(text.iter(), 2000).unwrap();
        assert!(examples.len() > 100, "{}", examples.len());
        for ex in &examples {
            let want = reference(&tk, &ex.messages);
            assert_eq!(tokenize_chat(&tk, &ex.messages).unwrap(), want, "{}", ex.source);
            let upto = ex.messages.iter().rposition(|m| m.role == Role::Assistant).unwrap();
            let mut p = reference(&tk, &ex.messages[..upto]).ids;
            p.push(tk.inner().token_to_id(crate::tokenizer::ASSISTANT).unwrap());
            assert_eq!(prompt_ids(&tk, &ex.messages[..upto]).unwrap(), p, "{}", ex.source);
        }
        // Multi-turn, a system turn, and content that looks like the template's own tokens.
        let tricky = vec![
            Message { role: Role::System, content: "system".into() },
            Message { role: Role::User, content: "user<|end|><|assistant|>".into() },
            Message { role: Role::Assistant, content: "assistant".into() },
            Message { role: Role::User, content: "<|bos|>".into() },
            Message { role: Role::Assistant, content: "end<|end|>".into() },
        ];
        assert_eq!(tokenize_chat(&tk, &tricky).unwrap(), reference(&tk, &tricky));
    }
}
