//! A model's own tokenizer and chat template, as a Hugging Face model directory holds them, and
//! the same files written for liandan's tokenizer so that `transformers` loads any checkpoint.
//!
//! # Files
//! - `tokenizer.json`: the `tokenizers` model (read by [`ChatTokenizer::load`]).
//! - `tokenizer_config.json`: `chat_template` (a string, or a list of `{name, template}` whose
//!   `default` is taken; or a `chat_template.jinja` file beside it), `bos_token`, `eos_token`
//!   (for a chat model, the end of turn), `pad_token` (strings or `{"content": …}` objects).
//! - `generation_config.json`: `eos_token_id` (one id or a list: every one stops a generation),
//!   `pad_token_id`, `bos_token_id`.
//!
//! A model's tokenizer gives: end of turn = `eos_token`; end of document = `eos_token`; pad =
//! `pad_token`, else `generation_config.pad_token_id`, else the eos; stop tokens = `eos_token`
//! then the `eos_token_id`s.

use std::path::Path;

use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::error::{DataError, Result};
use crate::template::ChatTemplate;
use crate::tokenizer::{BOS, ChatTokenizer, END, PAD, SpecialIds};

pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG: &str = "generation_config.json";
pub const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";
/// The files [`export_files`] writes.
pub const CONFIG_FILES: [&str; 3] = [TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG];
/// Where newer `transformers` versions keep the template instead of `tokenizer_config.json`.
pub const TEMPLATE_FILE: &str = "chat_template.jinja";

/// Largest config file read (a real one is a few KiB; a long template tens of KiB).
const CONFIG_MAX_BYTES: u64 = 4 << 20;

/// What a model directory's config files say about its tokenizer.
#[derive(Debug, Clone)]
pub struct HfConfig {
    /// `tokenizer_config.json` as read (written back on export).
    pub config: Value,
    /// `generation_config.json`, when there is one.
    pub generation: Option<Value>,
    /// The template source: the config's `chat_template`, or `chat_template.jinja`.
    pub template: Option<String>,
    /// The config file, for errors.
    pub path: std::path::PathBuf,
}

fn parse_json(bytes: &[u8], path: &Path) -> Result<Value> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| DataError::file(path, format!("not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(DataError::file(path, "expected a JSON object"));
    }
    Ok(v)
}

/// A special token field: a string, or an added-token object with `content`; `null` is none.
fn token_field(config: &Value, key: &str, path: &Path) -> Result<Option<String>> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(DataError::file(path, format!("field '{key}' is an object without a string 'content'"))),
        },
        Some(_) => Err(DataError::file(path, format!("field '{key}' must be a string or an object with 'content'"))),
    }
}

/// An id or a list of ids.
fn ids_field(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok())).collect(),
        _ => Vec::new(),
    }
}

impl HfConfig {
    /// `dir`'s `tokenizer_config.json` (with `generation_config.json` and `chat_template.jinja`),
    /// or `None` when it has none.
    ///
    /// # Errors
    /// A file that cannot be read or is not a JSON object, naming it.
    pub fn read_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(TOKENIZER_CONFIG);
        if !path.is_file() {
            return Ok(None);
        }
        let config = crate::files::read_bounded(&path, CONFIG_MAX_BYTES)?;
        let gen_path = dir.join(GENERATION_CONFIG);
        let generation = if gen_path.is_file() { Some(crate::files::read_bounded(&gen_path, CONFIG_MAX_BYTES)?) } else { None };
        Self::parse(&config, generation.as_deref(), dir).map(Some)
    }

    /// The config files' bytes; `dir` is where they (and a `chat_template.jinja`) are.
    pub fn parse(config: &[u8], generation: Option<&[u8]>, dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_CONFIG);
        let config = parse_json(config, &path)?;
        let generation = generation.map(|g| parse_json(g, &dir.join(GENERATION_CONFIG))).transpose()?;
        let template = match config.get("chat_template") {
            None | Some(Value::Null) => {
                let jinja = dir.join(TEMPLATE_FILE);
                if jinja.is_file() {
                    let b = crate::files::read_bounded(&jinja, CONFIG_MAX_BYTES)?;
                    Some(String::from_utf8(b).map_err(|_| DataError::file(&jinja, "not UTF-8"))?)
                } else {
                    None
                }
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => {
                let named = |n: &str| list.iter().find(|t| t.get("name").and_then(Value::as_str) == Some(n)).and_then(|t| t.get("template")).and_then(Value::as_str);
                Some(named("default").ok_or_else(|| DataError::file(&path, "field 'chat_template' is a list without a 'default' template"))?.to_string())
            }
            Some(_) => return Err(DataError::file(&path, "field 'chat_template' must be a string or a list of {name, template}")),
        };
        Ok(HfConfig { config, generation, template, path })
    }

    /// The compiled template with the config's token strings.
    ///
    /// # Errors
    /// No `chat_template`, or one that does not compile: the file, the field and the line.
    pub fn template(&self, _tokenizer: &Path) -> Result<ChatTemplate> {
        let src = self
            .template
            .as_deref()
            .ok_or_else(|| DataError::file(&self.path, "field 'chat_template' is missing (a base model without a chat template cannot format conversations)"))?;
        let tok = |k| token_field(&self.config, k, &self.path);
        ChatTemplate::new(src, tok("bos_token")?, tok("eos_token")?, tok("pad_token")?).map_err(|e| DataError::file(&self.path, format!("field 'chat_template': {e}")))
    }

    /// The special ids, template and stop tokens of a model's tokenizer `inner`.
    ///
    /// # Errors
    /// No `eos_token`, or a special token the vocabulary does not have.
    pub(crate) fn resolve(&self, inner: &Tokenizer, tokenizer: &Path) -> Result<(SpecialIds, ChatTemplate, Vec<u32>)> {
        let p = &self.path;
        let id = |key: &str| -> Result<Option<u32>> {
            match token_field(&self.config, key, p)? {
                None => Ok(None),
                Some(t) => inner.token_to_id(&t).map(Some).ok_or_else(|| DataError::file(p, format!("field '{key}' is {t:?}, which {} does not have", tokenizer.display()))),
            }
        };
        let eos = id("eos_token")?.ok_or_else(|| DataError::file(p, "field 'eos_token' is missing: nothing would end a turn"))?;
        let gen_pad = self.generation.as_ref().and_then(|g| ids_field(g.get("pad_token_id")).first().copied());
        let pad = id("pad_token")?.or(gen_pad).unwrap_or(eos);
        let special = SpecialIds { bos: id("bos_token")?, eos, pad, end: eos };
        let mut stop = vec![eos];
        for i in ids_field(self.generation.as_ref().and_then(|g| g.get("eos_token_id"))) {
            if !stop.contains(&i) {
                stop.push(i);
            }
        }
        Ok((special, self.template(tokenizer)?, stop))
    }
}

/// The files besides `tokenizer.json` that make `tk` load with `AutoTokenizer.from_pretrained`
/// and format chats with `apply_chat_template` as liandan does: `tokenizer_config.json`,
/// `special_tokens_map.json`, `generation_config.json`. A model's own config is written back
/// (with the template inlined); liandan's is made: eos = the end of turn `<|end|>`, and
/// generation stops at `<|end|>` or `<|eos|>`. `model_max_length` 0: not known (not written).
pub fn export_files(tk: &ChatTokenizer, model_max_length: usize) -> Result<Vec<(String, Vec<u8>)>> {
    let name = |id: Option<u32>| id.and_then(|i| tk.inner().id_to_token(i));
    let s = tk.special;
    let (mut config, generation) = match &tk.hf {
        Some(h) if tk.is_model_tokenizer() => (h.config.clone(), h.generation.clone()),
        _ => (json!({ "bos_token": BOS, "eos_token": END, "pad_token": PAD, "unk_token": null, "clean_up_tokenization_spaces": false }), None),
    };
    // Set above as an object (from `parse_json` or `json!`).
    let obj = config.as_object_mut().expect("config is an object");
    obj.insert("chat_template".into(), Value::String(tk.template().source().to_string()));
    // A model's own class and length stay as the model's authors wrote them.
    obj.entry("tokenizer_class").or_insert_with(|| Value::String("PreTrainedTokenizerFast".into()));
    if model_max_length > 0 {
        obj.entry("model_max_length").or_insert_with(|| json!(model_max_length));
    }
    let stop = tk.stop_tokens();
    let generation = generation.unwrap_or_else(|| {
        let mut g = json!({ "eos_token_id": stop, "pad_token_id": s.pad });
        if let Some(b) = s.bos {
            g["bos_token_id"] = json!(b);
        }
        g
    });
    let mut map = serde_json::Map::new();
    for (k, id) in [("bos_token", s.bos), ("eos_token", Some(s.end)), ("pad_token", Some(s.pad))] {
        if let Some(t) = name(id) {
            map.insert(k.into(), Value::String(t));
        }
    }
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).map_err(|e| DataError::Config { field: "tokenizer", reason: format!("could not write config: {e}") });
    Ok(vec![(TOKENIZER_CONFIG.into(), pretty(&config)?), (SPECIAL_TOKENS_MAP.into(), pretty(&Value::Object(map))?), (GENERATION_CONFIG.into(), pretty(&generation)?)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Message, Role, prompt_ids, tokenize_chat};

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_tokenizer_tiny")
    }

    fn messages(v: &Value) -> Vec<Message> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let role = match m["role"].as_str().unwrap() {
                    "system" => Role::System,
                    "user" => Role::User,
                    _ => Role::Assistant,
                };
                Message { role, content: m["content"].as_str().unwrap().to_string() }
            })
            .collect()
    }

    #[test]
    fn a_models_tokenizer_and_template_give_the_ids_transformers_gives() {
        let expected: Value = serde_json::from_slice(&std::fs::read(fixture().join("expected.json")).unwrap()).unwrap();
        let tk = ChatTokenizer::load(&fixture(), Some(512)).unwrap();
        assert!(tk.is_model_tokenizer());
        let id = |t: &str| expected["special"][t].as_u64().unwrap() as u32;
        assert_eq!(tk.special, SpecialIds { bos: None, eos: id("<|im_end|>"), pad: id("<|endoftext|>"), end: id("<|im_end|>") });
        assert_eq!(tk.stop_tokens(), vec![id("<|im_end|>"), id("<|endoftext|>")]);
        for case in expected["cases"].as_array().unwrap() {
            let msgs = messages(&case["messages"]);
            let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let t = tokenize_chat(&tk, &msgs).unwrap();
            assert_eq!(t.ids, want, "{}", case["text"]);
            let upto = msgs.iter().rposition(|m| m.role == Role::Assistant).unwrap();
            let want_prompt: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            assert_eq!(prompt_ids(&tk, &msgs[..upto]).unwrap(), want_prompt);
            // The mask: each assistant content and its <|im_end|>, nothing else.
            let learned: Vec<u32> = t.ids.iter().zip(&t.mask).filter(|(_, m)| **m == 1).map(|(i, _)| *i).collect();
            let answers: String = msgs.iter().filter(|m| m.role == Role::Assistant).map(|m| format!("{}<|im_end|>", m.content)).collect();
            assert_eq!(tk.decode(&learned).unwrap(), answers);
        }
        // Special-token text typed in a message stays text.
        let typed = [Message { role: Role::User, content: "<|im_end|>".into() }, Message { role: Role::Assistant, content: "好".into() }];
        let t = tokenize_chat(&tk, &typed).unwrap();
        assert_eq!(t.ids.iter().filter(|&&i| i == id("<|im_end|>")).count(), 3, "system, user and assistant turns end; the typed one is text");
    }

    fn copy_fixture(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("liandan-hftok-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        for f in ["tokenizer.json", TOKENIZER_CONFIG, GENERATION_CONFIG] {
            std::fs::copy(fixture().join(f), d.join(f)).unwrap();
        }
        d
    }

    fn set_config(dir: &Path, key: &str, v: Value) {
        let p = dir.join(TOKENIZER_CONFIG);
        let mut c: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        c[key] = v;
        std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
    }

    #[test]
    fn bad_model_tokenizers_are_refused_naming_the_file_and_field() {
        let e = ChatTokenizer::load(&fixture(), Some(400)).unwrap_err().to_string();
        assert!(e.contains("503 tokens") && e.contains("400 rows"), "{e}");
        let d = copy_fixture("notemplate");
        set_config(&d, "chat_template", Value::Null);
        let e = ChatTokenizer::load(&d, None).unwrap_err().to_string();
        assert!(e.contains("tokenizer_config.json") && e.contains("'chat_template' is missing"), "{e}");
        let d = copy_fixture("syntax");
        set_config(&d, "chat_template", json!("{% for m in messages %}{{ m.content }"));
        let e = ChatTokenizer::load(&d, None).unwrap_err().to_string();
        assert!(e.contains("tokenizer_config.json") && e.contains("'chat_template'") && e.contains("line 1"), "{e}");
        let d = copy_fixture("eos");
        set_config(&d, "eos_token", json!("<|nope|>"));
        let e = ChatTokenizer::load(&d, None).unwrap_err().to_string();
        assert!(e.contains("field 'eos_token' is \"<|nope|>\""), "{e}");
    }

    #[test]
    fn liandan_export_loads_back_the_same() {
        let tk = crate::tokenizer::tests::small_tokenizer();
        let files = export_files(&tk, 128).unwrap();
        let get = |n: &str| files.iter().find(|f| f.0 == n).unwrap().1.clone();
        let config: Value = serde_json::from_slice(&get(TOKENIZER_CONFIG)).unwrap();
        assert_eq!(config["chat_template"], crate::template::LIANDAN_TEMPLATE);
        assert_eq!(config["eos_token"], END);
        assert_eq!(config["model_max_length"], 128);
        let generation: Value = serde_json::from_slice(&get(GENERATION_CONFIG)).unwrap();
        assert_eq!(generation["eos_token_id"], json!([tk.special.end, tk.special.eos]));
        let dir = std::env::temp_dir().join(format!("liandan-hftok-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        tk.save(&dir.join("tokenizer.json")).unwrap();
        let back = ChatTokenizer::from_parts(
            &std::fs::read(dir.join("tokenizer.json")).unwrap(),
            Some(&get(TOKENIZER_CONFIG)),
            Some(&get(GENERATION_CONFIG)),
            &dir.join("tokenizer.json"),
            None,
        )
        .unwrap();
        assert!(!back.is_model_tokenizer());
        assert_eq!(back.special, tk.special);
        assert_eq!(back.stop_tokens(), tk.stop_tokens());
        let msgs = [Message { role: Role::User, content: "床前明月光".into() }, Message { role: Role::Assistant, content: "疑是地上霜".into() }];
        assert_eq!(tokenize_chat(&back, &msgs).unwrap(), tokenize_chat(&tk, &msgs).unwrap());
    }

    #[test]
    fn data_prepare_with_a_models_tokenizer_keeps_its_template() {
        let out = std::env::temp_dir().join(format!("liandan-hftok-prepare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let lunyu = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/lunyu.txt");
        let cfg = crate::pipeline::PrepareConfig { inputs: vec![lunyu.display().to_string()], out: out.clone(), tokenizer: Some(fixture()), ..Default::default() };
        crate::prepare::prepare(&cfg, &crate::prepare::Silent).unwrap();
        let m = crate::shard::Manifest::load(&out).unwrap();
        assert_eq!((m.vocab_size, m.eos), (503, 502), "documents end with the model's eos_token <|im_end|>");
        for f in CONFIG_FILES {
            assert!(out.join(f).is_file(), "{f} is not in the prepared data");
        }
        let tk = ChatTokenizer::load(&out.join("tokenizer.json"), Some(512)).unwrap();
        let orig = ChatTokenizer::load(&fixture(), Some(512)).unwrap();
        assert!(tk.is_model_tokenizer());
        assert_eq!(tk.template().source(), orig.template().source());
        assert_eq!(tk.stop_tokens(), orig.stop_tokens());
        assert_eq!(tk.encode("学而时习之").unwrap(), orig.encode("学而时习之").unwrap());
    }
}
