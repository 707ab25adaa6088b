//! The text tool-call format for models without native tool calling: the tools are described
//! in the system prompt and the model answers with `<tool_call>{"name": ..., "arguments":
//! {...}}</tool_call>` blocks. Parsing is forgiving about what small local models actually
//! print (code fences, a bare JSON object, `parameters` for `arguments`, arguments as a JSON
//! string, trailing commas, text around the call); what it still cannot read is reported so
//! the loop can ask once for a repair.

use serde_json::Value;

use crate::model::{ToolCall, ToolSpec};

/// The instructions appended to the system prompt in text mode.
pub fn instructions(tools: &[ToolSpec]) -> String {
    let mut s = String::from(
        "You can call tools. To call one, reply with one block per call, exactly like:\n\
         <tool_call>{\"name\": \"TOOL\", \"arguments\": {...}}</tool_call>\n\
         Several blocks in one reply run in order. When you are done, reply with plain text \
         and no tool call.\nTools (name: description; JSON schema of arguments):\n",
    );
    for t in tools {
        s.push_str(&format!(
            "- {}: {}; {}\n",
            t.name, t.description, t.parameters
        ));
    }
    s
}

/// What a text reply held.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// No tool call: a final answer.
    Text,
    /// The calls, in order.
    Calls(Vec<ToolCall>),
    /// Something that looks like a call but could not be read; the message says why.
    Malformed(String),
}

/// Parses a reply. `step` makes call ids unique within a run.
pub fn parse(text: &str, step: u64) -> Parsed {
    let mut bodies: Vec<String> = Vec::new();
    let mut rest = text;
    let mut tagged = false;
    while let Some(start) = rest.find("<tool_call>") {
        tagged = true;
        let after = &rest[start + "<tool_call>".len()..];
        match after.find("</tool_call>") {
            Some(end) => {
                bodies.push(after[..end].to_string());
                rest = &after[end + "</tool_call>".len()..];
            }
            None => {
                // An unclosed block: take what follows (models often stop before the tag).
                bodies.push(after.to_string());
                rest = "";
            }
        }
    }
    if !tagged {
        // A fenced or bare JSON object that names a tool counts as a call.
        let candidate = strip_fences(text);
        if let Some(obj) = first_object(candidate) {
            if obj.contains("\"name\"")
                && (obj.contains("\"arguments\"") || obj.contains("\"parameters\""))
            {
                bodies.push(obj.to_string());
            }
        }
        if bodies.is_empty() {
            return Parsed::Text;
        }
    }
    let mut calls = Vec::new();
    for (i, b) in bodies.iter().enumerate() {
        match parse_one(b) {
            Ok((name, args)) => calls.push(ToolCall {
                id: format!("call_{step}_{i}"),
                name,
                arguments: args.to_string(),
            }),
            Err(e) => {
                return Parsed::Malformed(format!("tool call {} could not be read: {e}", i + 1))
            }
        }
    }
    Parsed::Calls(calls)
}

fn strip_fences(s: &str) -> &str {
    let t = s.trim();
    if let Some(inner) = t.strip_prefix("```") {
        let inner = inner.trim_start_matches(|c: char| c.is_ascii_alphabetic());
        return inner.trim_end().trim_end_matches("```");
    }
    t
}

/// The first balanced `{...}` of `s` (strings and escapes respected).
fn first_object(s: &str) -> Option<&str> {
    let start = s.find('{')?;
    let mut depth = 0i32;
    let mut in_str = false;
    let mut esc = false;
    for (i, c) in s[start..].char_indices() {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&s[start..start + i + 1]);
                }
            }
            _ => {}
        }
    }
    None
}

/// Removes commas directly before `}` or `]` (outside strings).
fn drop_trailing_commas(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let chars: Vec<char> = s.chars().collect();
    let mut in_str = false;
    let mut esc = false;
    for (i, &c) in chars.iter().enumerate() {
        if in_str {
            out.push(c);
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        if c == ',' {
            let next = chars[i + 1..].iter().find(|c| !c.is_whitespace());
            if matches!(next, Some('}') | Some(']')) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// Closes the braces a reply left open (models often stop one `}` short).
fn close_open(s: &str) -> Option<String> {
    let start = s.find('{')?;
    let (mut depth, mut in_str, mut esc) = (0i32, false, false);
    for c in s[start..].chars() {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
    }
    (depth > 0 && !in_str)
        .then(|| format!("{}{}", s[start..].trim_end(), "}".repeat(depth as usize)))
}

fn parse_one(body: &str) -> Result<(String, Value), String> {
    let body = strip_fences(body);
    let closed;
    let obj = match first_object(body) {
        Some(o) => o,
        None => {
            closed = close_open(body).ok_or("no JSON object found")?;
            closed.as_str()
        }
    };
    let v: Value = serde_json::from_str(obj)
        .or_else(|_| serde_json::from_str(&drop_trailing_commas(obj)))
        .map_err(|e| format!("invalid JSON ({e})"))?;
    let name = v["name"]
        .as_str()
        .or_else(|| v["tool"].as_str())
        .ok_or("missing \"name\"")?
        .to_string();
    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(Value::String(s)) => serde_json::from_str(s)
            .map_err(|e| format!("\"arguments\" is a string that is not JSON ({e})"))?,
        Some(o @ Value::Object(_)) => o.clone(),
        Some(_) => return Err("\"arguments\" must be an object".into()),
    };
    Ok((name, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &Parsed) -> String {
        match p {
            Parsed::Text => "text".into(),
            Parsed::Malformed(m) => format!("malformed: {m}"),
            Parsed::Calls(c) => c
                .iter()
                .map(|c| format!("{}({})", c.name, c.arguments))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    #[test]
    fn parses_what_models_print() {
        let cases = [
            "All done, the tests pass.",
            "<tool_call>{\"name\": \"exec\", \"arguments\": {\"cmd\": \"ls\"}}</tool_call>",
            "Let me look.\n<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"a.py\",}}\n</tool_call> then",
            "<tool_call>{\"name\":\"exec\",\"arguments\":\"{\\\"cmd\\\":\\\"pwd\\\"}\"}</tool_call><tool_call>{\"name\":\"list\",\"parameters\":{}}</tool_call>",
            "```json\n{\"name\": \"exec\", \"arguments\": {\"cmd\": \"make\"}}\n```",
            "<tool_call>{\"name\": \"exec\", \"arguments\": {\"cmd\": \"ls\"}",
            "<tool_call>{\"name\": \"exec\", \"arguments\": {\"cmd\": </tool_call>",
            "<tool_call>{\"arguments\": {}}</tool_call>",
            "Here is {\"some\": \"json\"} but no call",
        ];
        let got: Vec<String> = cases.iter().map(|c| names(&parse(c, 1))).collect();
        expect_test::expect![[r#"
            [
                "text",
                "exec({\"cmd\":\"ls\"})",
                "read_file({\"path\":\"a.py\"})",
                "exec({\"cmd\":\"pwd\"}) list({})",
                "exec({\"cmd\":\"make\"})",
                "exec({\"cmd\":\"ls\"})",
                "malformed: tool call 1 could not be read: invalid JSON (expected value at line 1 column 38)",
                "malformed: tool call 1 could not be read: missing \"name\"",
                "text",
            ]
        "#]]
        .assert_debug_eq(&got);
    }
}
