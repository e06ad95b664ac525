//! A loaded model: the GGUF file, its llama-family weights and batched forward, its
//! tokenizer and chat template; and where the default model comes from.
//!
//! [`Model::load`] opens a GGUF, checks that it is whole and of an architecture we
//! run, and resolves the [`WeightsMode`]. [`Model::info`] describes it for
//! `troupe model info`.

pub mod arch;
pub mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_simd;
mod bf16;
pub mod catalogue;
pub mod chat;
mod embedding;
pub mod fetch;
pub mod gguf_check;
mod kquants;
pub mod linear;
pub mod llama;
pub mod profile;
mod qgemv;
pub mod tiny;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Tensor};

pub use bf16::has_native_bf16;
pub use chat::{ChatTemplate, Message, Role};
use linear::{Large, ResolvedMode};
pub use linear::{WeightsMode, AUTO_BF16_SMALL_ROWS, AUTO_QUANT_MAX_ROWS};
pub use llama::{Llama, LlamaConfig, SeqInput};
pub use tokenizer::{IncrementalDecoder, Tokenizer};

use crate::kv::{KvCache, KvDtype};
use crate::{Error, Result};

/// An opened GGUF file whose header was read and whose size was checked.
pub struct GgufFile {
    path: PathBuf,
    reader: BufReader<File>,
    /// Header: metadata and tensor table.
    pub content: gguf_file::Content,
}

impl GgufFile {
    /// Opens `path`, checking the magic bytes, the header and that the file holds
    /// every byte its tensor table points at.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::ModelNotFound {
                path: path.to_path_buf(),
            },
            _ => Error::Io(e),
        })?;
        let actual = file.metadata()?.len();
        let mut magic = [0u8; 4];
        let got = file.read(&mut magic)?;
        if got < 4 || &magic != b"GGUF" {
            return Err(Error::NotGguf {
                path: path.to_path_buf(),
                magic: magic[..got].to_vec(),
            });
        }
        // Our own walk first: candle's reader divides by `general.alignment`.
        gguf_check::walk_header(path)?;
        let mut reader = BufReader::new(File::open(path)?);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| Error::BadGguf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        gguf_check::check_tensors(path, &content, actual)?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            content,
        })
    }

    /// Whether the file has a tensor of that name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads a tensor, checking its shape (`[rows, cols]` as the model uses it).
    pub fn tensor(&mut self, name: &str, dims: &[usize]) -> Result<QTensor> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::Tensor {
                name: name.into(),
                reason: "missing".into(),
            })?;
        if info.shape.dims() != dims {
            return Err(Error::Tensor {
                name: name.into(),
                reason: format!("shape {:?}, expected {dims:?}", info.shape.dims()),
            });
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| Error::Tensor {
                name: name.into(),
                reason: e.to_string(),
            })
    }

    /// A string metadata value.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.content
            .metadata
            .get(key)?
            .to_string()
            .ok()
            .map(|s| s.as_str())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header and the reader, e.g. for candle-transformers' own loaders.
    pub fn into_parts(self) -> (gguf_file::Content, BufReader<File>) {
        (self.content, self.reader)
    }
}

/// How to load a model.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Weight storage and kernel choice.
    pub weights: WeightsMode,
}

/// What `troupe model info` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// The GGUF file.
    pub path: PathBuf,
    /// File size in bytes.
    pub file_bytes: u64,
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`, if any.
    pub name: Option<String>,
    /// Total parameters over all tensors.
    pub parameters: u64,
    /// Number of tensors per storage type (`Q4_1`, `F32`…).
    pub tensor_types: BTreeMap<String, usize>,
    /// Hyper-parameters.
    pub config: LlamaConfig,
    /// Beginning-of-sequence token (id, text).
    pub bos: Option<(u32, String)>,
    /// End-of-sequence tokens (id, text).
    pub eos: Vec<(u32, String)>,
    /// Whether the GGUF embeds `tokenizer.chat_template`.
    pub chat_template_embedded: bool,
    /// `tokenizer.ggml.pre`: how text is split before BPE.
    pub pretokenizer: String,
    /// The weights mode asked for.
    pub weights_requested: WeightsMode,
    /// What the forward uses, and why.
    pub weights_chosen: String,
    /// SHA-256 of the first MiB of tensor data: tells two models of one shape apart
    /// (agent snapshots check it).
    pub fingerprint: String,
    /// KV cache bytes per token, per element type (`f32`, `f16`).
    pub kv_bytes_per_token: BTreeMap<String, usize>,
}

/// A loaded model: weights, tokenizer, chat template.
pub struct Model {
    /// Built on first use: walking the vocabulary costs tens of milliseconds.
    llama: Llama,
    tokenizer: Tokenizer,
    chat_template: ChatTemplate,
    info: ModelInfo,
}

impl Model {
    /// Loads a GGUF of one of the [`arch::Arch`]s (llama, qwen2, qwen3).
    pub fn load(path: &Path, opts: LoadOptions) -> Result<Self> {
        let mut file = GgufFile::open(path)?;
        let architecture = file
            .meta_str("general.architecture")
            .ok_or_else(|| Error::Metadata {
                key: "general.architecture".into(),
                reason: "missing".into(),
            })?
            .to_string();
        arch::Arch::from_name(&architecture)?;
        let config = LlamaConfig::from_gguf(&file.content)?;
        gguf_check::check_special_tokens(&file.content, config.vocab_size)?;
        let tokenizer = Tokenizer::from_gguf(&file.content)?;
        let embedded = file.meta_str("tokenizer.chat_template").map(str::to_string);
        let chat_template = match &embedded {
            Some(src) => ChatTemplate::new(
                src,
                &tokenizer
                    .bos_token_id()
                    .map(|i| tokenizer.token_text(i))
                    .unwrap_or_default(),
                &tokenizer
                    .eos_token_ids()
                    .first()
                    .map(|&i| tokenizer.token_text(i))
                    .unwrap_or_default(),
            )?,
            None => ChatTemplate::chatml(),
        };
        let parameters: u64 = file
            .content
            .tensor_infos
            .values()
            .map(|t| t.shape.elem_count() as u64)
            .sum();
        let mut tensor_types = BTreeMap::new();
        for t in file.content.tensor_infos.values() {
            *tensor_types
                .entry(format!("{:?}", t.ggml_dtype))
                .or_insert(0) += 1;
        }
        let (resolved, weights_chosen) = resolve_mode(opts.weights, parameters, &tensor_types);
        let fingerprint = fingerprint(path, file.content.tensor_data_offset)?;
        let llama = Llama::load(&mut file, config.clone(), resolved)?;
        let kv_bytes_per_token = [KvDtype::F32, KvDtype::F16]
            .into_iter()
            .map(|d| {
                (
                    d.to_string(),
                    KvCache::bytes_per_token(config.kv_layout(), d),
                )
            })
            .collect();
        let info = ModelInfo {
            file_bytes: std::fs::metadata(path)?.len(),
            path: path.to_path_buf(),
            name: file.meta_str("general.name").map(str::to_string),
            architecture,
            parameters,
            tensor_types,
            config,
            bos: tokenizer
                .bos_token_id()
                .map(|i| (i, tokenizer.token_text(i))),
            eos: tokenizer
                .eos_token_ids()
                .iter()
                .map(|&i| (i, tokenizer.token_text(i)))
                .collect(),
            chat_template_embedded: embedded.is_some(),
            pretokenizer: tokenizer.pretokenizer().to_string(),
            weights_requested: opts.weights,
            weights_chosen,
            fingerprint,
            kv_bytes_per_token,
        };
        Ok(Self {
            llama,
            tokenizer,
            chat_template,
            info,
        })
    }

    /// The forward: see [`Llama::forward`].
    pub fn forward(&self, seqs: &mut [SeqInput<'_>]) -> Result<Tensor> {
        self.llama.forward(seqs)
    }

    /// Logits of every new token: see [`Llama::forward_all`].
    pub fn forward_all(&self, seqs: &mut [SeqInput<'_>]) -> Result<Tensor> {
        self.llama.forward_all(seqs)
    }

    /// A new empty cache for this model.
    pub fn new_cache(&self, dtype: KvDtype) -> KvCache {
        KvCache::new(self.llama.config().kv_layout(), dtype)
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        self.llama.config()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template (the GGUF's own, or ChatML).
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.chat_template
    }

    /// Description for `troupe model info`.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
}

/// SHA-256 (hex) of up to the first MiB of a GGUF's tensor data.
fn fingerprint(path: &Path, data_offset: u64) -> Result<String> {
    use sha2::Digest;
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(data_offset))?;
    let mut buf = Vec::with_capacity(1 << 20);
    f.take(1 << 20).read_to_end(&mut buf)?;
    Ok(format!("{:x}", sha2::Sha256::digest(&buf)))
}

/// Bytes of memory the system reports as available (Linux), if known.
fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resolves `auto`: keep an f32 copy beside the quantized weights when it fits in
/// half of the available memory, and say what was chosen.
fn resolve_mode(
    mode: WeightsMode,
    parameters: u64,
    types: &BTreeMap<String, usize>,
) -> (ResolvedMode, String) {
    // The storage types of the weight matrices (norms are always f32).
    let stored = types
        .keys()
        .filter(|t| !matches!(t.as_str(), "F32" | "F16" | "BF16"))
        .cloned()
        .collect::<Vec<_>>()
        .join("+");
    // The formats whose blocks `auto` reads for small steps (the others decode
    // slower than the bf16 copy reads: see `QuantRows::reads_faster_than_bf16`).
    let quick = types
        .keys()
        .filter(|t| matches!(t.as_str(), "Q4_0" | "Q4_1" | "Q8_0"))
        .cloned()
        .collect::<Vec<_>>()
        .join("+");
    match mode {
        WeightsMode::Native => (
            ResolvedMode::Native,
            format!("native: {stored} kernels for every step"),
        ),
        WeightsMode::F32 => (
            ResolvedMode::F32,
            "f32: dequantized weights, f32 GEMM for every step".into(),
        ),
        WeightsMode::Q8_0 => (
            ResolvedMode::Q8_0,
            "q8_0: weights requantized to Q8_0 for every step".into(),
        ),
        WeightsMode::Bf16 => (
            ResolvedMode::Bf16,
            format!(
                "bf16: bf16 weights and activations, f32 sums, for every step ({})",
                if has_native_bf16() {
                    "avx512_bf16"
                } else {
                    "portable loop: this CPU has no avx512_bf16"
                }
            ),
        ),
        WeightsMode::Exact => exact_mode(parameters, &stored, "exact"),
        WeightsMode::Auto if has_native_bf16() => {
            let bytes = parameters * 2;
            match available_memory() {
                Some(avail) if bytes <= avail / 2 => (
                    ResolvedMode::Split {
                        small_rows: AUTO_BF16_SMALL_ROWS,
                        large: Large::Bf16,
                    },
                    format!(
                        "auto: bf16 products with f32 sums: {}from a bf16 copy ({} MiB) with avx512_bf16 for {} steps ({} MiB available)",
                        if quick.is_empty() {
                            String::new()
                        } else {
                            format!("from the stored {quick} blocks for steps of at most {AUTO_BF16_SMALL_ROWS} rows, ")
                        },
                        mib(bytes),
                        if quick.is_empty() { "all" } else { "larger" },
                        mib(avail)
                    ),
                ),
                _ => exact_mode(parameters, &stored, "auto"),
            }
        }
        WeightsMode::Auto => exact_mode(parameters, &stored, "auto"),
    }
}

fn mib(b: u64) -> u64 {
    b / (1 << 20)
}

/// The stored blocks with f32 activations for small steps and an f32 copy for large
/// ones, when that copy fits in half of the available memory; else native.
fn exact_mode(parameters: u64, stored: &str, asked: &str) -> (ResolvedMode, String) {
    let f32_bytes = parameters * 4;
    match available_memory() {
        Some(avail) if f32_bytes <= avail / 2 => (
            ResolvedMode::Split {
                small_rows: AUTO_QUANT_MAX_ROWS,
                large: Large::F32,
            },
            format!(
                "{asked}: stored {stored} blocks x f32 activations for steps of at most {AUTO_QUANT_MAX_ROWS} rows, an f32 copy ({} MiB) with GEMM for larger steps ({} MiB available)",
                mib(f32_bytes),
                mib(avail)
            ),
        ),
        avail => (
            ResolvedMode::Native,
            format!(
                "{asked}: {stored} kernels only: an f32 copy ({} MiB) would not fit in half of the available memory ({})",
                mib(f32_bytes),
                avail.map(|a| format!("{} MiB", mib(a))).unwrap_or_else(|| "unknown".into())
            ),
        ),
    }
}
