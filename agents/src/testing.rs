//! Test support: the tiny model (written once per test binary) and a check that a
//! grammar, compiled by llguidance exactly as an agent compiles it, accepts a text.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use troupe::grammar::Grammar;
use troupe::Model;

/// The tiny random-weight model (byte-level tokenizer: every text tokenizes).
pub(crate) fn tiny_model() -> Arc<Model> {
    static MODEL: OnceLock<(tempfile::TempDir, Arc<Model>)> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let gguf: PathBuf = dir.path().join("tiny.gguf");
            troupe::model::tiny::write_tiny_model(&gguf, &Default::default()).unwrap();
            let model = Arc::new(Model::load(&gguf, Default::default()).unwrap());
            (dir, model)
        })
        .1
        .clone()
}

/// Whether `grammar`, compiled by the model's grammar compiler, accepts `text` as a
/// whole output (a matcher fed the text's tokens ends in an accepting state).
pub(crate) fn accepts(grammar: &Grammar, text: &str) -> bool {
    let model = tiny_model();
    let compiled = troupe::grammar::GrammarCompiler::new(model.tokenizer())
        .unwrap()
        .compile(grammar)
        .unwrap();
    let tokens = model.tokenizer().encode(text).unwrap();
    compiled.constraint().accepts_tokens(&tokens)
}
