//! Loading a model file that is not GGUF, truncated, or of another architecture
//! fails with an error that names the problem; `troupe model info` describes a good
//! one.

mod common;

use common::*;
use troupe::model::{LoadOptions, Model, WeightsMode};
use troupe::Error;

fn load_err(bytes: &[u8]) -> Error {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, bytes).unwrap();
    match Model::load(&p, LoadOptions::default()) {
        Ok(_) => panic!("loading should fail"),
        Err(e) => e,
    }
}

#[test]
fn not_gguf_is_named() {
    let e = load_err(b"PK\x03\x04 this is a zip, not a model");
    assert!(matches!(e, Error::NotGguf { .. }), "{e}");
    assert!(e.to_string().contains("not a GGUF file"), "{e}");
}

#[test]
fn truncated_file_is_named() {
    let full = std::fs::read(tiny_model_path()).unwrap();
    let e = load_err(&full[..full.len() - 1000]);
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
    // Cut inside the header: still a named GGUF error, not a panic.
    let e = load_err(&full[..200]);
    assert!(
        matches!(e, Error::BadGguf { .. } | Error::Truncated { .. }),
        "{e}"
    );
}

#[test]
fn other_architecture_is_named() {
    let full = std::fs::read(tiny_model_path()).unwrap();
    // Same-length replacement of the architecture string in the header.
    let pos = full.windows(5).position(|w| w == b"llama").unwrap();
    let mut bytes = full.clone();
    bytes[pos..pos + 5].copy_from_slice(b"mamba");
    let e = load_err(&bytes);
    assert!(
        matches!(e, Error::UnsupportedArchitecture { ref arch } if arch == "mamba"),
        "{e}"
    );
}

#[test]
fn missing_file_says_how_to_fetch() {
    let e = Model::load(
        std::path::Path::new("/nonexistent/model.gguf"),
        LoadOptions::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("troupe model fetch"), "{e}");
}

#[test]
fn info_describes_the_default_model() {
    let m = real(WeightsMode::Auto);
    let info = m.info();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.config.vocab_size, 49_152);
    assert_eq!(info.config.n_layers, 30);
    assert_eq!(info.config.hidden, 576);
    assert!(
        info.parameters > 130_000_000 && info.parameters < 140_000_000,
        "{}",
        info.parameters
    );
    assert_eq!(info.tensor_types.get("Q4_1"), Some(&210));
    assert!(info.chat_template_embedded);
    assert_eq!(info.pretokenizer, "smollm");
    assert_auto_path(&m);
    assert_eq!(info.kv_bytes_per_token["f16"], 30 * 2 * 3 * 64 * 2);
    assert_eq!(info.kv_bytes_per_token["f32"], 30 * 2 * 3 * 64 * 4);
}
