//! An MCP server's tool as an ordinary troupe [`Tool`]: its argument schema is the
//! tool's `inputSchema` (closed to its declared properties), and its result is the
//! text content of the server's answer, with a short note for each image, audio clip
//! or resource.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::link::{RemoteTool, ServerLink};
use crate::agent::tools::Tool;

/// How closely a tool's calls follow its `inputSchema`: llguidance compiles most
/// schemas as they are; one with keywords it does not implement is compiled
/// leniently (those keywords ignored); one that does not compile even so gets a
/// looser grammar (any JSON object), and the server checks the arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SchemaMode {
    /// The schema, exactly.
    Strict,
    /// The schema without what llguidance does not implement (the reason).
    Lenient(String),
    /// Any JSON object (why the schema did not compile).
    Loose(String),
}

/// An MCP server's tool.
#[derive(Clone)]
pub struct McpTool {
    /// The name the model calls it by (prefixed with the server's name on a clash).
    name: String,
    tool: RemoteTool,
    /// The argument schema the call grammar follows.
    schema: serde_json::Value,
    mode: SchemaMode,
    link: Arc<ServerLink>,
}

impl McpTool {
    pub(super) fn new(name: String, tool: RemoteTool, link: Arc<ServerLink>) -> Self {
        let schema = prepare(&tool.schema);
        Self {
            name,
            tool,
            schema,
            mode: SchemaMode::Strict,
            link,
        }
    }

    /// The same tool with its calls following the schema in `mode`.
    pub fn with_mode(mut self, mode: SchemaMode) -> Self {
        self.schema = match mode {
            SchemaMode::Loose(_) => serde_json::json!({"type": "object"}),
            _ => prepare(&self.tool.schema),
        };
        self.mode = mode;
        self
    }

    /// How its calls follow its schema.
    pub fn mode(&self) -> &SchemaMode {
        &self.mode
    }

    /// The server's name.
    pub fn server(&self) -> &str {
        self.link.name()
    }

    /// The server's name for the tool.
    pub fn remote_name(&self) -> &str {
        &self.tool.remote
    }

    /// The `inputSchema` as the server gave it.
    pub fn input_schema(&self) -> &serde_json::Value {
        &self.tool.schema
    }
}

impl Tool for McpTool {
    fn name(&self) -> &str {
        &self.name
    }
    fn description(&self) -> &str {
        &self.tool.description
    }
    fn parameters(&self) -> serde_json::Value {
        self.schema.clone()
    }
    fn lenient_schema(&self) -> bool {
        matches!(self.mode, SchemaMode::Lenient(_))
    }
    fn call(
        &self,
        arguments: serde_json::Value,
    ) -> BoxFuture<'static, std::result::Result<String, String>> {
        let link = self.link.clone();
        let remote = self.tool.remote.clone();
        Box::pin(async move { link.call(&remote, arguments).await })
    }
}

/// The schema a call grammar follows: an object schema (one without a `type` is
/// taken as an object), its annotations that constrain nothing dropped, and every
/// object with declared properties closed to them (as troupe's own tools are), so a
/// small model cannot invent fields.
fn prepare(schema: &serde_json::Value) -> serde_json::Value {
    let mut s = schema.clone();
    if let Some(o) = s.as_object_mut() {
        o.entry("type").or_insert_with(|| "object".into());
        o.remove("$schema");
    } else {
        s = serde_json::json!({"type": "object"});
    }
    // The call grammar nests the schema inside the call's own, where a `#/...`
    // reference would no longer point at the tool's definitions: inline them.
    let root = s.clone();
    inline_refs(&mut s, &root, 0);
    if let Some(o) = s.as_object_mut() {
        o.remove("$defs");
        o.remove("definitions");
    }
    close_objects(&mut s);
    s
}

/// Deepest nesting of inlined references; a recursive schema is cut there (any
/// value, which the server checks).
const MAX_REF_DEPTH: usize = 8;

/// Replaces each local `{"$ref": "#/..."}` by what it points at (its other keys
/// kept), recursively.
fn inline_refs(v: &mut serde_json::Value, root: &serde_json::Value, depth: usize) {
    if let Some(o) = v.as_object_mut() {
        if let Some(target) = o.get("$ref").and_then(|r| r.as_str()).map(str::to_string) {
            if let Some(pointer) = target.strip_prefix('#') {
                let mut resolved = match root.pointer(pointer) {
                    Some(t) if depth < MAX_REF_DEPTH => t.clone(),
                    _ => serde_json::json!({}),
                };
                inline_refs(&mut resolved, root, depth + 1);
                o.remove("$ref");
                if let Some(r) = resolved.as_object() {
                    for (k, val) in r {
                        o.entry(k.clone()).or_insert_with(|| val.clone());
                    }
                }
                return;
            }
        }
        for (k, child) in o.iter_mut() {
            if k != "$defs" && k != "definitions" {
                inline_refs(child, root, depth);
            }
        }
    } else if let Some(a) = v.as_array_mut() {
        a.iter_mut().for_each(|c| inline_refs(c, root, depth));
    }
}

fn close_objects(v: &mut serde_json::Value) {
    if let Some(o) = v.as_object_mut() {
        if o.contains_key("properties") && !o.contains_key("additionalProperties") {
            o.insert("additionalProperties".into(), false.into());
        }
        for child in o.values_mut() {
            close_objects(child);
        }
    } else if let Some(a) = v.as_array_mut() {
        a.iter_mut().for_each(close_objects);
    }
}

/// The tool message of a `tools/call` result: its text content, a note for each
/// image, audio clip, resource or link, the structured content when there is no
/// text; `Err` when the server flagged it as an error.
pub(super) fn result_text(
    result: &rmcp::model::CallToolResult,
) -> std::result::Result<String, String> {
    let v = serde_json::to_value(result).unwrap_or_default();
    let mut parts = Vec::new();
    for c in v["content"].as_array().into_iter().flatten() {
        let kind = c["type"].as_str().unwrap_or("unknown");
        let mime = c["mimeType"].as_str().unwrap_or("unknown type");
        parts.push(match kind {
            "text" => c["text"].as_str().unwrap_or_default().to_string(),
            "image" | "audio" => format!(
                "[{kind}: {mime}, {} bytes of base64, not shown]",
                c["data"].as_str().map_or(0, str::len)
            ),
            "resource" => {
                let r = &c["resource"];
                let uri = r["uri"].as_str().unwrap_or("?");
                match r["text"].as_str() {
                    Some(t) => format!("[resource {uri}]\n{t}"),
                    None => format!(
                        "[resource {uri}: {}, binary, not shown]",
                        r["mimeType"].as_str().unwrap_or("unknown type")
                    ),
                }
            }
            "resource_link" => format!(
                "[resource link {}: {}]",
                c["uri"].as_str().unwrap_or("?"),
                c["name"].as_str().unwrap_or("")
            ),
            other => format!("[{other} content, not shown]"),
        });
    }
    if parts.is_empty() {
        if let Some(s) = v.get("structuredContent") {
            parts.push(s.to_string());
        }
    }
    let text = parts.join("\n");
    if v["isError"].as_bool() == Some(true) {
        Err(if text.is_empty() {
            "the tool reported an error".into()
        } else {
            text
        })
    } else {
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_become_text_with_notes() {
        let r: rmcp::model::CallToolResult = serde_json::from_value(serde_json::json!({
            "content": [
                {"type": "text", "text": "hello"},
                {"type": "image", "data": "AAAA", "mimeType": "image/png"},
                {"type": "resource", "resource": {"uri": "file:///a", "text": "body"}},
            ]
        }))
        .unwrap();
        assert_eq!(
            result_text(&r).unwrap(),
            "hello\n[image: image/png, 4 bytes of base64, not shown]\n[resource file:///a]\nbody"
        );
        let e: rmcp::model::CallToolResult = serde_json::from_value(serde_json::json!({
            "content": [{"type": "text", "text": "no such file"}], "isError": true
        }))
        .unwrap();
        assert_eq!(result_text(&e).unwrap_err(), "no such file");
    }

    #[test]
    fn schemas_are_closed_objects() {
        let s = prepare(&serde_json::json!({
            "$schema": "x", "properties": {"a": {"type": "object", "properties": {}}}
        }));
        assert_eq!(s["type"], "object");
        assert!(s.get("$schema").is_none());
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["a"]["additionalProperties"], false);
        let nested = prepare(&serde_json::json!({
            "$defs": {"City": {"type": "object", "properties": {"name": {"type": "string"}}},
                      "Loop": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Loop"}}}},
            "properties": {"to": {"$ref": "#/$defs/City", "description": "where"},
                           "chain": {"$ref": "#/$defs/Loop"}},
            "type": "object"
        }));
        assert!(nested.get("$defs").is_none());
        assert_eq!(
            nested["properties"]["to"]["properties"]["name"]["type"],
            "string"
        );
        assert_eq!(nested["properties"]["to"]["description"], "where");
        assert_eq!(nested["properties"]["to"]["additionalProperties"], false);
        assert!(!nested.to_string().contains("$ref"), "{nested}");
    }
}
