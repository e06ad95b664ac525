//! `troupe generate`: one completion for one prompt, on the calling thread, with the
//! engine's own decode state and stop conditions, optionally under a grammar.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use troupe::engine::{generate, Sequence};
use troupe::grammar::{Grammar, GrammarCompiler};
use troupe::model::{Message, Model};
use troupe::sampling::{Sampler, SamplingParams, TokenConstraint};
use troupe::KvDtype;

/// What `troupe generate` was asked.
pub(crate) struct GenerateOptions<'a> {
    pub prompt: &'a str,
    pub system: Option<&'a str>,
    /// The prompt as it is, without the chat template.
    pub raw: bool,
    pub max_tokens: usize,
    pub temperature: f32,
    pub seed: u64,
    pub json_schema: Option<&'a Path>,
    pub strict_schema: bool,
    pub regex: Option<&'a str>,
    pub lark: Option<&'a Path>,
    pub choice: Option<&'a [String]>,
    pub kv_dtype: KvDtype,
}

fn grammar(o: &GenerateOptions) -> anyhow::Result<Option<Grammar>> {
    let read =
        |f: &Path| std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()));
    Ok(if let Some(f) = o.json_schema {
        let schema = serde_json::from_str(&read(f)?)
            .with_context(|| format!("{} is not JSON", f.display()))?;
        Some(if o.strict_schema {
            Grammar::StrictJsonSchema(schema)
        } else {
            Grammar::JsonSchema(schema)
        })
    } else if let Some(r) = o.regex {
        Some(Grammar::Regex(r.to_string()))
    } else if let Some(f) = o.lark {
        Some(Grammar::Lark(read(f)?))
    } else {
        o.choice.map(|c| Grammar::Choice(c.to_vec()))
    })
}

/// Generates and streams the text to stdout.
pub(crate) fn run(model: &Model, o: GenerateOptions) -> anyhow::Result<()> {
    let constraint: Option<Box<dyn TokenConstraint>> = match grammar(&o)? {
        Some(g) => {
            let compiled = GrammarCompiler::new(model.tokenizer())?.compile(&g)?;
            if let Some(dropped) = compiled.dropped() {
                eprintln!(
                    "note: the grammar cannot enforce part of the schema ({dropped}); the output is validated against the whole schema when it ends"
                );
            }
            Some(Box::new(compiled.constraint()))
        }
        None => None,
    };
    let text = if o.raw {
        o.prompt.to_string()
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = o.system {
            msgs.push(Message::system(s));
        }
        msgs.push(Message::user(o.prompt));
        model.chat_template().render(&msgs, true)?
    };
    let ids = model.tokenizer().encode_prompt(&text)?;
    let room = model.config().context_length.saturating_sub(ids.len());
    if room == 0 {
        bail!(
            "the prompt has {} tokens, the model's context is {}",
            ids.len(),
            model.config().context_length
        );
    }
    let sampler = Sampler::new(SamplingParams {
        temperature: o.temperature,
        seed: o.seed,
        ..Default::default()
    })?;
    let seq = Sequence::new(ids, sampler, constraint, &[], o.max_tokens.min(room), false);
    let mut cache = model.new_cache(o.kv_dtype);
    let mut out = std::io::stdout().lock();
    let mut written = Ok(());
    generate(model, &mut cache, seq, |text| {
        if written.is_ok() {
            written = out.write_all(text.as_bytes()).and_then(|()| out.flush());
        }
    })?;
    written?;
    writeln!(out)?;
    Ok(())
}
