//! Article text from HTML: a tolerant tag scanner (crawled pages are rarely well-formed).
//!
//! Elements that never hold article text are dropped with their content: `script`, `style`,
//! `nav`, `footer`, `header`, `aside`, `noscript`, `form`, `select`, `button`, `iframe`, `svg`,
//! `template`. Block elements (`p`, `div`, `li`, `h1`–`h6`, `br`, `tr`, …) end a line, so each
//! paragraph becomes one line of the document and the line rules of [`crate::clean`] can judge
//! it on its own. Entities are decoded.

/// Elements dropped with everything inside them.
const SKIP: &[&str] = &["script", "style", "nav", "footer", "header", "aside", "noscript", "form", "select", "button", "iframe", "svg", "template", "head"];

/// Elements that start or end a line.
const BLOCK: &[&str] = &[
    "p",
    "div",
    "br",
    "li",
    "ul",
    "ol",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "tr",
    "td",
    "th",
    "table",
    "section",
    "article",
    "main",
    "blockquote",
    "pre",
    "dd",
    "dt",
    "dl",
    "hr",
    "title",
    "body",
];

/// The text of `html`, one line per block, blank lines collapsed.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut skip: Option<String> = None;
    let mut skip_depth = 0usize;
    let mut rest = html;
    while !rest.is_empty() {
        let Some(lt) = rest.find('<') else {
            if skip.is_none() {
                push_text(&mut out, rest);
            }
            break;
        };
        if skip.is_none() {
            push_text(&mut out, &rest[..lt]);
        }
        rest = &rest[lt..];
        // A '<' that cannot open a tag ("x < y") is text.
        if !rest[1..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '/' || c == '!' || c == '?') {
            if skip.is_none() {
                push_text(&mut out, "<");
            }
            rest = &rest[1..];
            continue;
        }
        if let Some(after) = rest.strip_prefix("<!--") {
            rest = after.find("-->").map_or("", |e| &after[e + 3..]);
            continue;
        }
        let Some(gt) = rest.find('>') else { break };
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        let closing = tag.starts_with('/');
        let name: String = tag.trim_start_matches('/').chars().take_while(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase();
        if name.is_empty() {
            continue; // <!DOCTYPE …>, <?xml …?>, stray '<'
        }
        let self_closing = tag.ends_with('/');
        if let Some(s) = &skip {
            if name == *s {
                if closing {
                    skip_depth -= 1;
                    if skip_depth == 0 {
                        skip = None;
                    }
                } else if !self_closing {
                    skip_depth += 1;
                }
            }
            continue;
        }
        if SKIP.contains(&name.as_str()) && !closing && !self_closing {
            skip = Some(name);
            skip_depth = 1;
            continue;
        }
        if BLOCK.contains(&name.as_str()) && !out.ends_with('\n') && !out.is_empty() {
            out.push('\n');
        }
    }
    // Trim every line and drop empty ones.
    out.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("\n")
}

fn push_text(out: &mut String, raw: &str) {
    // Whitespace inside HTML text (newlines in the source) is a single space.
    let decoded = decode_entities(raw);
    let mut last_space = out.ends_with(' ') || out.ends_with('\n') || out.is_empty();
    for ch in decoded.chars() {
        if ch.is_whitespace() && ch != '\u{3000}' {
            if !last_space {
                out.push(' ');
                last_space = true;
            }
        } else {
            out.push(ch);
            last_space = false;
        }
    }
}

/// Decodes the entities that occur in practice: named basics and numeric references.
pub fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let end = rest.char_indices().take(12).find(|(_, c)| *c == ';').map(|(i, _)| i);
        let decoded = end.and_then(|e| {
            let ent = &rest[1..e];
            let ch = match ent {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" | "#39" => Some('\''),
                "nbsp" => Some(' '),
                "copy" => Some('©'),
                "middot" => Some('·'),
                "hellip" => Some('…'),
                "mdash" => Some('—'),
                "ldquo" => Some('“'),
                "rdquo" => Some('”'),
                _ => ent
                    .strip_prefix("#x")
                    .or_else(|| ent.strip_prefix("#X"))
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .or_else(|| ent.strip_prefix('#').and_then(|d| d.parse().ok()))
                    .and_then(char::from_u32),
            };
            ch.map(|c| (c, e))
        });
        match decoded {
            Some((c, e)) => {
                out.push(c);
                rest = &rest[e + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_paragraphs_and_drops_chrome() {
        let page = r#"<!DOCTYPE html><html><head><title>T</title><style>p{color:red}</style></head>
<body><nav><a href="/">首页</a> | <a>关于我们</a></nav>
<script>var x = "<p>not text</p>";</script>
<article><h1>春晓</h1><p>春眠不觉晓，
处处闻啼鸟。</p><p>夜来风雨声&amp;花落知多少&#12290;</p><div><div>嵌套<br/>换行</div></div></article>
<footer><p>版权所有 © 2024</p></footer></body></html>"#;
        let text = html_to_text(page);
        assert_eq!(text, "春晓\n春眠不觉晓， 处处闻啼鸟。\n夜来风雨声&花落知多少。\n嵌套\n换行");
    }

    #[test]
    fn unclosed_and_nested_skips_do_not_leak() {
        assert_eq!(html_to_text("<div>a<script>b<script>c</script>d</script>e</div>"), "ae");
        assert_eq!(html_to_text("x < y and <b>z</b>"), "x < y and z");
    }
}
