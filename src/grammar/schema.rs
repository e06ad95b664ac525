//! JSON Schemas beyond what llguidance enforces while decoding: the lenient compile
//! (the keywords it cannot enforce dropped from the grammar) and the check of the
//! finished output against the whole schema, with the `jsonschema` crate.

use llguidance::{ParserFactory, TokenParser};

use crate::{Error, Result};

/// Compiles `schema` in llguidance's lenient mode after its strict compile failed
/// with `strict_error`, and builds the validator that checks outputs against the
/// whole schema. Fails (naming the strict error) when even the lenient compile, or
/// the validator, cannot be built.
pub(super) fn lenient(
    factory: &ParserFactory,
    schema: &serde_json::Value,
    strict_error: anyhow::Error,
) -> Result<(TokenParser, Option<OutputCheck>)> {
    let fail = |why: String| Error::Grammar {
        kind: "JSON Schema",
        message: why,
    };
    let Some(lenient) = lenient_schema(schema) else {
        return Err(fail(strict_error.to_string()));
    };
    let grammar = llguidance::api::TopLevelGrammar::from_json_schema(lenient);
    let parser = factory
        .create_parser(grammar)
        .map_err(|e| fail(format!("{strict_error}; even leniently: {e}")))?;
    let validator = jsonschema::options().build(schema).map_err(|e| {
        fail(format!(
            "{strict_error}; and the schema cannot be validated: {e}"
        ))
    })?;
    let dropped = strict_error.to_string();
    tracing::warn!(
        dropped = %dropped,
        "JSON Schema compiled leniently: outputs are validated against the whole schema"
    );
    Ok((parser, Some(OutputCheck { validator, dropped })))
}

/// `schema` with llguidance's lenient mode switched on (its `x-guidance` options
/// kept), for embedding in a larger grammar; `None` when it is not an object.
pub fn lenient_schema(schema: &serde_json::Value) -> Option<serde_json::Value> {
    let serde_json::Value::Object(map) = schema else {
        return None;
    };
    let mut lenient = map.clone();
    let mut options = match lenient.remove("x-guidance") {
        Some(serde_json::Value::Object(o)) => o,
        _ => serde_json::Map::new(),
    };
    options.insert("lenient".into(), true.into());
    lenient.insert("x-guidance".into(), options.into());
    Some(lenient.into())
}

/// Validates finished outputs against a whole schema.
pub(crate) struct OutputCheck {
    validator: jsonschema::Validator,
    dropped: String,
}

impl OutputCheck {
    /// What the grammar dropped, as llguidance named it.
    pub fn dropped(&self) -> &str {
        &self.dropped
    }

    /// `Ok` when `text` is JSON valid against the whole schema; otherwise an error
    /// naming each violation (where in the output, and the keyword).
    pub fn validate(&self, text: &str) -> Result<()> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::SchemaViolation {
                violations: format!("not JSON: {e}"),
            })?;
        let violations: Vec<String> = self
            .validator
            .iter_errors(&value)
            .take(8)
            .map(|e| {
                let at = e.instance_path.to_string();
                let at = if at.is_empty() { "/".to_string() } else { at };
                format!("at {at}: {e} (keyword {})", e.schema_path)
            })
            .collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(Error::SchemaViolation {
                violations: violations.join("; "),
            })
        }
    }
}
