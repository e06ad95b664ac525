//! A malformed GGUF is an error, never a panic or an abort: the tiny model mutated
//! field by field (every numeric header field set to 0, 1, max, max - 1 and a wrapping
//! value; floats to 0, -1, NaN, infinity and 1e30) and truncated at every section
//! boundary, loaded in-process (under `catch_unwind`, so a panic names the mutation)
//! and through `troupe model info`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use troupe::model::gguf_check::{header_map, HeaderField};
use troupe::model::{LoadOptions, Model, SeqInput, WeightsMode};

/// A mutated copy of the tiny model: what was changed, and the file's bytes.
struct Mutant {
    label: String,
    bytes: Vec<u8>,
}

fn int_values(width: u8) -> Vec<u64> {
    let bits = u32::from(width) * 8;
    let max = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let mut v = vec![0, 1, max, max - 1, 1u64 << (bits - 1)];
    if bits == 64 {
        // Times 64 (a dim of the tiny model) wraps to 0.
        v.push(1u64 << 58);
    }
    v
}

fn mutants_of(field: &HeaderField, original: &[u8]) -> Vec<Mutant> {
    let at = field.offset as usize;
    let w = usize::from(field.width);
    let mut out = Vec::new();
    let mut push = |label: String, new: &[u8]| {
        if &original[at..at + w] != new {
            let mut bytes = original.to_vec();
            bytes[at..at + w].copy_from_slice(new);
            out.push(Mutant { label, bytes });
        }
    };
    if field.float {
        for x in [0.0f64, -1.0, f64::NAN, f64::INFINITY, 1e30] {
            let new = if w == 4 {
                (x as f32).to_le_bytes().to_vec()
            } else {
                x.to_le_bytes().to_vec()
            };
            push(format!("{} = {x}", field.name), &new);
        }
    } else {
        for x in int_values(field.width) {
            push(format!("{} = {x:#x}", field.name), &x.to_le_bytes()[..w]);
        }
    }
    out
}

fn all_mutants(path: &Path) -> (Vec<Mutant>, Vec<Mutant>) {
    let original = std::fs::read(path).unwrap();
    let map = header_map(path).unwrap();
    assert!(map.fields.len() > 100, "few fields: {}", map.fields.len());
    let fields: Vec<Mutant> = map
        .fields
        .iter()
        .flat_map(|f| mutants_of(f, &original))
        .collect();
    // Truncated: at and just before every header section boundary, at the start of
    // each tensor's data, and a byte short of the end.
    let mut cuts: Vec<u64> = map.boundaries.clone();
    let mut f = std::fs::File::open(path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    cuts.push(ct.tensor_data_offset);
    cuts.extend(
        ct.tensor_infos
            .values()
            .map(|t| ct.tensor_data_offset + t.offset),
    );
    cuts.extend(0..8);
    cuts.push(original.len() as u64 - 1);
    let mut lens: Vec<u64> = cuts
        .iter()
        .flat_map(|&c| [c, c.saturating_sub(1), c + 1])
        .filter(|&c| c < original.len() as u64)
        .collect();
    lens.sort_unstable();
    lens.dedup();
    let truncated = lens
        .into_iter()
        .map(|n| Mutant {
            label: format!("truncated to {n} bytes"),
            bytes: original[..n as usize].to_vec(),
        })
        .collect();
    (fields, truncated)
}

/// Loads `path`; on success uses the model a little (tokenizer, a forward, the
/// grammar compiler), as `troupe chat` would at start.
fn load_and_use(path: &Path) -> Result<(), String> {
    let m = Model::load(
        path,
        LoadOptions {
            weights: WeightsMode::Native,
        },
    )
    .map_err(|e| e.to_string())?;
    let ids = m.tokenizer().encode("the cat").map_err(|e| e.to_string())?;
    let mut c = cache(&m);
    if !ids.is_empty() {
        let _ = m.forward(&mut [SeqInput {
            tokens: &ids,
            cache: &mut c,
        }]);
    }
    troupe::grammar::GrammarCompiler::new(m.tokenizer()).map_err(|e| e.to_string())?;
    Ok(())
}

fn write(dir: &Path, i: usize, m: &Mutant) -> PathBuf {
    let p = dir.join(format!("mutant-{i}.gguf"));
    std::fs::write(&p, &m.bytes).unwrap();
    p
}

/// The tiny model with the optional fields a real file has too (alignment, EOT and
/// padding ids, a chat template), so that they are mutated as well.
fn base_model() -> &'static Path {
    use candle_core::quantized::gguf_file::{self, Value};
    static BASE: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    &BASE
        .get_or_init(|| {
            let mut f = std::fs::File::open(tiny_model_path()).unwrap();
            let ct = gguf_file::Content::read(&mut f).unwrap();
            let mut meta: Vec<(String, Value)> = ct
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            meta.sort_by(|a, b| a.0.cmp(&b.0));
            meta.push(("general.alignment".into(), Value::U32(32)));
            meta.push(("tokenizer.ggml.eot_token_id".into(), Value::U32(2)));
            meta.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(0)));
            meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)));
            meta.push((
                "tokenizer.chat_template".into(),
                Value::String("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
            ));
            let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
            names.sort();
            let tensors: Vec<(String, candle_core::quantized::QTensor)> = names
                .into_iter()
                .map(|n| {
                    let t = ct.tensor(&mut f, n, &candle_core::Device::Cpu).unwrap();
                    (n.clone(), t)
                })
                .collect();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("base.gguf");
            let mut out = std::fs::File::create(&path).unwrap();
            let meta_refs: Vec<(&str, &Value)> =
                meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let tensor_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
                tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
            gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
            (dir, path)
        })
        .1
}

#[test]
fn the_base_model_loads_and_its_alignment_is_mutated() {
    load_and_use(base_model()).unwrap();
    let map = header_map(base_model()).unwrap();
    assert!(map.fields.iter().any(|f| f.name == "general.alignment"));
    let original = std::fs::read(base_model()).unwrap();
    let field = map
        .fields
        .iter()
        .find(|f| f.name == "general.alignment")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for m in mutants_of(field, &original) {
        let p = write(dir.path(), 0, &m);
        let e = Model::load(&p, LoadOptions::default()).err();
        if m.label.ends_with("= 0x0") {
            let e = e.expect("alignment 0 loaded").to_string();
            assert!(e.contains("general.alignment"), "{e}");
        }
    }
}

#[test]
fn every_mutated_or_truncated_gguf_loads_cleanly_or_fails_with_an_error() {
    let (fields, truncated) = all_mutants(base_model());
    let dir = tempfile::tempdir().unwrap();
    let mut panics = Vec::new();
    let (mut ok, mut err) = (0, 0);
    for (i, m) in fields.iter().chain(&truncated).enumerate() {
        let p = write(dir.path(), i, m);
        match std::panic::catch_unwind(|| load_and_use(&p)) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(_)) => err += 1,
            Err(_) => panics.push(m.label.clone()),
        }
        std::fs::remove_file(&p).unwrap();
    }
    eprintln!(
        "{} mutated fields and {} truncations: {ok} loaded, {err} errors, {} panics",
        fields.len(),
        truncated.len(),
        panics.len()
    );
    assert!(panics.is_empty(), "panicked on: {panics:#?}");
    assert!(err > fields.len() / 3, "too few errors: {err}");
    // Every truncation that cuts into a tensor is an error (padding after the last
    // tensor may go).
    let mut f = std::fs::File::open(base_model()).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let data_end = ct
        .tensor_infos
        .values()
        .map(|t| {
            let bytes = t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size();
            ct.tensor_data_offset + t.offset + bytes as u64
        })
        .max()
        .unwrap();
    for (i, m) in truncated.iter().enumerate() {
        if (m.bytes.len() as u64) < data_end {
            let p = write(dir.path(), i, m);
            assert!(
                Model::load(&p, LoadOptions::default()).is_err(),
                "{} loaded",
                m.label
            );
        }
    }
}

#[test]
fn the_cli_reports_a_malformed_gguf_without_panicking() {
    let (fields, truncated) = all_mutants(base_model());
    let dir = tempfile::tempdir().unwrap();
    // Through the binary: every truncation and every other field mutation.
    let chosen: Vec<&Mutant> = fields.iter().step_by(2).chain(&truncated).collect();
    let mut failures = Vec::new();
    for (i, m) in chosen.iter().enumerate() {
        let p = write(dir.path(), i, m);
        let out = Command::new(common::troupe_bin())
            .args(["model", "info", "--model"])
            .arg(&p)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let by_signal = out.status.code().is_none();
        if by_signal || stderr.contains("panicked") || stderr.contains("stack backtrace") {
            failures.push(format!("{}: {:?} {stderr}", m.label, out.status));
        }
        if !out.status.success() && !stderr.contains("error") {
            failures.push(format!("{}: no error message: {stderr}", m.label));
        }
        std::fs::remove_file(&p).unwrap();
    }
    eprintln!("{} files through `troupe model info`", chosen.len());
    assert!(failures.is_empty(), "{failures:#?}");
}
