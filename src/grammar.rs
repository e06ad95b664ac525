//! Output grammars: a [`Grammar`] spec (regex, JSON Schema, Lark, choice list) is
//! compiled by llguidance once, when it is configured, and each generation gets its
//! own matcher that masks the logits at every step and follows the sampled tokens.
//!
//! One [`GrammarCompiler`] per tokenizer holds llguidance's `ParserFactory` (built
//! from our tokenizer's token bytes) and a cache of compiled grammars, so a thousand
//! agents sharing one schema compile it once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

mod schema;

pub use schema::lenient_schema;

use crate::model::Tokenizer;
use crate::sampling::TokenConstraint;
use crate::{Error, Result};

/// What an output must look like.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grammar {
    /// The whole output matches this regular expression (Rust regex syntax).
    Regex(String),
    /// The output is JSON valid against this schema. Keywords llguidance cannot
    /// enforce while decoding (`uniqueItems`, `not`, ...) are dropped from the grammar
    /// (llguidance's lenient mode) and the finished output is validated against the
    /// whole schema instead: a violation is an error, never silently invalid JSON.
    JsonSchema(serde_json::Value),
    /// As [`Grammar::JsonSchema`], but a schema with keywords llguidance cannot
    /// enforce is refused, naming them (OpenAI's `strict: true`, `--strict-schema`).
    StrictJsonSchema(serde_json::Value),
    /// The output parses by this Lark grammar (llguidance's dialect).
    Lark(String),
    /// The output is exactly one of these strings.
    Choice(Vec<String>),
}

impl Grammar {
    /// The kind, as errors name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Grammar::Regex(_) => "regex",
            Grammar::JsonSchema(_) | Grammar::StrictJsonSchema(_) => "JSON Schema",
            Grammar::Lark(_) => "Lark grammar",
            Grammar::Choice(_) => "choice",
        }
    }

    fn to_llguidance(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Grammar::Regex(r) => TopLevelGrammar::from_regex(r),
            Grammar::JsonSchema(s) | Grammar::StrictJsonSchema(s) => {
                TopLevelGrammar::from_json_schema(s.clone())
            }
            Grammar::Lark(l) => TopLevelGrammar::from_lark(l.clone()),
            Grammar::Choice(options) => {
                if options.is_empty() {
                    return Err(self.error("a choice needs at least one option"));
                }
                // JSON string literals are valid Lark string literals.
                let alts: Vec<String> = options
                    .iter()
                    .map(|o| serde_json::to_string(o).unwrap_or_default())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::Grammar {
            kind: self.kind(),
            message: message.into(),
        }
    }
}

/// llguidance's view of our tokenizer: token bytes, special tokens marked, and our
/// own encoder for the bytes it forces.
struct TokenizerBridge {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for TokenizerBridge {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode(text)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Most compiled grammars a [`GrammarCompiler`] keeps; past it the oldest goes.
pub const MAX_CACHED_GRAMMARS: usize = 256;

/// Compiled grammars by spec, and their insertion order (oldest first) to bound them.
#[derive(Default)]
struct Cache {
    map: HashMap<String, Arc<CompiledGrammar>>,
    order: std::collections::VecDeque<String>,
}

/// Compiles grammars for one tokenizer, caching them by spec (at most
/// [`MAX_CACHED_GRAMMARS`]).
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
    cache: Mutex<Cache>,
    compiles: AtomicU64,
    eos: Vec<u32>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("compiles", &self.compile_count())
            .finish()
    }
}

impl GrammarCompiler {
    /// Builds llguidance's parser factory from the tokenizer's vocabulary (done once
    /// per loaded model: it walks the whole vocabulary).
    pub fn new(tokenizer: &Tokenizer) -> Result<Self> {
        let mut words = Vec::with_capacity(tokenizer.vocab_size());
        for id in 0..tokenizer.vocab_size() as u32 {
            let mut bytes = tokenizer.token_bytes(id)?.to_vec();
            if tokenizer.is_special(id) {
                bytes.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
            }
            words.push(bytes);
        }
        let eos = tokenizer.eos_token_ids().to_vec();
        let first_eos = *eos
            .first()
            .ok_or_else(|| Error::Tokenizer("grammars need an end-of-sequence token".into()))?;
        let info = TokRxInfo::new(words.len() as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
        let env: TokEnv = Arc::new(TokenizerBridge {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities {
                ff_tokens: true,
                ..Default::default()
            },
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| Error::Tokenizer(format!("llguidance parser factory: {e}")))?;
        factory.set_stderr_log_level(0);
        factory.limits_mut().verbose_errors = false;
        Ok(Self {
            factory: Arc::new(factory),
            cache: Mutex::new(Cache::default()),
            compiles: AtomicU64::new(0),
            eos,
        })
    }

    /// Compiles `grammar`, or returns the cached compilation of an equal spec. A bad
    /// grammar fails here, naming its kind and llguidance's message.
    pub fn compile(&self, grammar: &Grammar) -> Result<Arc<CompiledGrammar>> {
        let key = serde_json::to_string(grammar).map_err(|e| grammar.error(e.to_string()))?;
        if let Some(c) = self.lock().map.get(&key) {
            return Ok(c.clone());
        }
        let (parser, check) = match self.factory.create_parser(grammar.to_llguidance()?) {
            Ok(parser) => (parser, None),
            Err(e) => match grammar {
                Grammar::JsonSchema(schema) => schema::lenient(&self.factory, schema, e)?,
                Grammar::StrictJsonSchema(_) => {
                    return Err(grammar.error(format!(
                        "{e} (strict: refusing keywords troupe cannot enforce while decoding)"
                    )))
                }
                _ => return Err(grammar.error(e.to_string())),
            },
        };
        self.compiles.fetch_add(1, Ordering::Relaxed);
        let compiled = Arc::new(CompiledGrammar {
            kind: grammar.kind(),
            template: Mutex::new(Matcher::new(Ok(parser))),
            eos: self.eos.clone(),
            check: check.map(Arc::new),
        });
        let mut cache = self.lock();
        if cache.map.insert(key.clone(), compiled.clone()).is_none() {
            cache.order.push_back(key);
        }
        while cache.map.len() > MAX_CACHED_GRAMMARS {
            let Some(old) = cache.order.pop_front() else {
                break;
            };
            cache.map.remove(&old);
        }
        Ok(compiled)
    }

    /// Checks a finished output of `grammar` against what its compiled form could not
    /// enforce (the keywords a lenient JSON Schema dropped); compiles it (cached) if
    /// needed. Outputs of other grammars always pass.
    pub fn check_output(&self, grammar: &Grammar, text: &str) -> Result<()> {
        match self.compile(grammar)?.check.as_deref() {
            Some(check) => check.validate(text),
            None => Ok(()),
        }
    }

    /// Whether `grammar` is compiled already (a compile would not run llguidance).
    pub fn is_cached(&self, grammar: &Grammar) -> bool {
        serde_json::to_string(grammar).is_ok_and(|key| self.lock().map.contains_key(&key))
    }

    /// How many compiled grammars are kept.
    pub fn cached(&self) -> usize {
        self.lock().map.len()
    }

    /// How many grammars were actually compiled (cache misses).
    pub fn compile_count(&self) -> u64 {
        self.compiles.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding the lock cannot leave the map half-written.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A compiled grammar; [`constraint`](Self::constraint) gives each generation its
/// own matcher (a cheap clone sharing the compiled grammar).
pub struct CompiledGrammar {
    kind: &'static str,
    template: Mutex<Matcher>,
    eos: Vec<u32>,
    /// The full schema's validator, when the grammar had to drop keywords.
    check: Option<Arc<schema::OutputCheck>>,
}

impl std::fmt::Debug for CompiledGrammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledGrammar")
            .field("kind", &self.kind)
            .finish()
    }
}

impl CompiledGrammar {
    /// A fresh matcher for one generation.
    pub fn constraint(&self) -> GrammarConstraint {
        let matcher = self
            .template
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .deep_clone();
        GrammarConstraint {
            matcher,
            kind: self.kind,
            eos: self.eos.clone(),
            mask_micros: Vec::new(),
            check: self.check.clone(),
        }
    }

    /// The keywords the grammar dropped (lenient JSON Schema), as llguidance named
    /// them; `None` when it enforces the whole spec.
    pub fn dropped(&self) -> Option<&str> {
        self.check.as_deref().map(|c| c.dropped())
    }

    /// The grammar's kind.
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

/// One generation's grammar state.
pub struct GrammarConstraint {
    matcher: Matcher,
    kind: &'static str,
    eos: Vec<u32>,
    /// Time of each mask computation, in microseconds.
    mask_micros: Vec<f64>,
    check: Option<Arc<schema::OutputCheck>>,
}

impl std::fmt::Debug for GrammarConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarConstraint")
            .field("kind", &self.kind)
            .finish()
    }
}

impl GrammarConstraint {
    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Grammar {
            kind: self.kind,
            message: format!("{what}: {e}"),
        }
    }

    /// Whether `bytes` is a complete output of this grammar (from the start).
    pub fn accepts_tokens(mut self, tokens: &[u32]) -> bool {
        for &t in tokens {
            if self.matcher.is_stopped() {
                return self.eos.contains(&t);
            }
            if self.matcher.consume_token(t).is_err() {
                return false;
            }
        }
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }
}

impl TokenConstraint for GrammarConstraint {
    fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let t = std::time::Instant::now();
        let mask = self
            .matcher
            .compute_mask()
            .map_err(|e| self.fail("cannot continue", e))?;
        self.mask_micros.push(t.elapsed().as_secs_f64() * 1e6);
        // A 32-bit word of the mask per 32 logits; words with every token allowed (most
        // of them, outside narrow grammars) cost one comparison.
        let words = mask.as_slice();
        for (chunk, &word) in logits.chunks_mut(32).zip(words) {
            if word != u32::MAX {
                for (bit, l) in chunk.iter_mut().enumerate() {
                    if word >> bit & 1 == 0 {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
        // Logits past the tokenizer's vocabulary are never allowed.
        if let Some(rest) = logits.get_mut(words.len() * 32..) {
            rest.fill(f32::NEG_INFINITY);
        }
        Ok(())
    }

    fn commit(&mut self, token: u32) -> Result<bool> {
        self.matcher
            .consume_token(token)
            .map_err(|e| self.fail("token rejected", e))?;
        Ok(self.matcher.is_stopped())
    }

    fn forced(&mut self) -> Vec<u32> {
        if self.matcher.is_stopped() {
            return Vec::new();
        }
        self.matcher.consume_ff_tokens()
    }

    fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    fn mask_times(&self) -> &[f64] {
        &self.mask_micros
    }

    fn check_output(&self, text: &str) -> Result<()> {
        match &self.check {
            Some(check) => check.validate(text),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compiled_grammar_cache_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::model::tiny::write_tiny_model(&path, &Default::default()).unwrap();
        let model = crate::Model::load(&path, Default::default()).unwrap();
        let c = GrammarCompiler::new(model.tokenizer()).unwrap();
        let n = MAX_CACHED_GRAMMARS + 20;
        for i in 0..n {
            c.compile(&Grammar::Regex(format!("a{i}"))).unwrap();
        }
        assert_eq!(c.cached(), MAX_CACHED_GRAMMARS);
        assert_eq!(c.compile_count(), n as u64);
        // The oldest went, the newest stayed.
        assert!(!c.is_cached(&Grammar::Regex("a0".into())));
        assert!(c.is_cached(&Grammar::Regex(format!("a{}", n - 1))));
    }
}
