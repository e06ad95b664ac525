//! Total checks of a GGUF file before and after candle reads it: a malformed file is
//! an [`Error`] that names the field, never a panic, an abort or a huge allocation.
//!
//! [`walk_header`] reads the header the way candle's reader does, but allocates
//! nothing the file cannot back and checks every length against the bytes left; it
//! rejects a `general.alignment` that is zero or not a power of two (candle divides by
//! it) and records where each numeric field sits, so the tests can mutate the file
//! field by field. [`check_tensors`] checks each tensor's element count, byte size and
//! offset with checked arithmetic against the file size.

use std::io::{BufReader, Read, Seek};
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType};

use crate::{Error, Result};

/// Deepest array nesting we follow (candle's own limit is of the same order).
const MAX_DEPTH: usize = 4;
/// Most dimensions of a tensor (as in ggml).
const MAX_DIMS: u32 = 4;

/// A numeric field of a GGUF header: where it is and how wide, for the tests that
/// mutate files field by field.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderField {
    /// What it is (`version`, `llama.context_length`, `token_embd.weight dim 1`…).
    pub name: String,
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes: 1, 2, 4 or 8.
    pub width: u8,
    /// Whether it is a float (f32 or f64) rather than an integer.
    pub float: bool,
}

/// What the walk found.
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct HeaderMap {
    /// The numeric fields (of arrays, only the first and last element).
    pub fields: Vec<HeaderField>,
    /// Offsets where a section ends: the fixed header, each metadata entry, each
    /// tensor info.
    pub boundaries: Vec<u64>,
}

struct Walker<R> {
    r: R,
    pos: u64,
    size: u64,
    /// GGUF v2/v3: lengths and dims are u64 (v1: u32).
    long: bool,
    map: HeaderMap,
}

fn bad(path: &Path, reason: String) -> Error {
    Error::BadGguf {
        path: path.to_path_buf(),
        reason,
    }
}

impl<R: Read + Seek> Walker<R> {
    fn room(&self, n: u64, what: &str) -> std::result::Result<(), String> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(format!(
                "{what}: {n} bytes at offset {} run past the end of the file ({} bytes)",
                self.pos, self.size
            )),
        }
    }

    fn skip(&mut self, n: u64, what: &str) -> std::result::Result<(), String> {
        self.room(n, what)?;
        let step = i64::try_from(n).map_err(|_| format!("{what}: length {n} too large"))?;
        self.r
            .seek_relative(step)
            .map_err(|e| format!("{what}: {e}"))?;
        self.pos += n;
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        self.room(N as u64, what)?;
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| format!("{what}: {e}"))?;
        self.pos += N as u64;
        Ok(b)
    }

    /// Records the numeric field about to be read, when `name` is given.
    fn note(&mut self, name: Option<&str>, width: u8, float: bool) {
        if let Some(name) = name {
            self.map.fields.push(HeaderField {
                name: name.to_string(),
                offset: self.pos,
                width,
                float,
            });
        }
    }

    fn u32(&mut self, name: Option<&str>, what: &str) -> std::result::Result<u32, String> {
        self.note(name, 4, false);
        Ok(u32::from_le_bytes(self.bytes::<4>(what)?))
    }

    fn u64(&mut self, name: Option<&str>, what: &str) -> std::result::Result<u64, String> {
        self.note(name, 8, false);
        Ok(u64::from_le_bytes(self.bytes::<8>(what)?))
    }

    /// A length or count: u32 in GGUF v1, u64 after.
    fn len(&mut self, name: Option<&str>, what: &str) -> std::result::Result<u64, String> {
        if self.long {
            self.u64(name, what)
        } else {
            Ok(u64::from(self.u32(name, what)?))
        }
    }

    /// A string; its bytes are returned when `keep` and it is short (keys, names).
    fn string(
        &mut self,
        name: Option<&str>,
        what: &str,
        keep: bool,
    ) -> std::result::Result<Option<Vec<u8>>, String> {
        let n = self.len(name, what)?;
        if keep && n <= 4096 {
            self.room(n, what)?;
            let mut v = vec![0u8; n as usize];
            self.r
                .read_exact(&mut v)
                .map_err(|e| format!("{what}: {e}"))?;
            self.pos += n;
            return Ok(Some(v));
        }
        self.skip(n, what)?;
        Ok(None)
    }

    /// A metadata value of type `ty`; returns it when it is an integer.
    fn value(
        &mut self,
        ty: u32,
        name: Option<&str>,
        depth: usize,
        what: &str,
    ) -> std::result::Result<Option<i128>, String> {
        let int = |b: &[u8], signed: bool| -> i128 {
            let mut x = [0u8; 16];
            x[..b.len()].copy_from_slice(b);
            if signed && b.last().is_some_and(|&l| l & 0x80 != 0) {
                x[b.len()..].fill(0xff);
            }
            i128::from_le_bytes(x)
        };
        Ok(match ty {
            0 | 1 | 7 => {
                self.note(name, 1, false);
                Some(int(&self.bytes::<1>(what)?, ty == 1))
            }
            2 | 3 => {
                self.note(name, 2, false);
                Some(int(&self.bytes::<2>(what)?, ty == 3))
            }
            4..=6 => {
                self.note(name, 4, ty == 6);
                let b = self.bytes::<4>(what)?;
                (ty != 6).then(|| int(&b, ty == 5))
            }
            10..=12 => {
                self.note(name, 8, ty == 12);
                let b = self.bytes::<8>(what)?;
                (ty != 12).then(|| int(&b, ty == 11))
            }
            8 => {
                self.string(name.map(|n| format!("{n} length")).as_deref(), what, false)?;
                None
            }
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{what}: arrays nested deeper than {MAX_DEPTH}"));
                }
                let elem = self.u32(name.map(|n| format!("{n} element type")).as_deref(), what)?;
                let count = self.len(name.map(|n| format!("{n} count")).as_deref(), what)?;
                for i in 0..count {
                    // Only the first and last elements are recorded (tokens arrays
                    // are long).
                    let label =
                        (i == 0 || i + 1 == count).then(|| format!("{}[{i}]", name.unwrap_or("")));
                    let label = name.and(label);
                    self.value(elem, label.as_deref(), depth + 1, what)?;
                }
                None
            }
            t => return Err(format!("{what}: unknown value type {t}")),
        })
    }
}

/// Walks the header of the GGUF at `path` (whose magic was checked), checking every
/// length against the file size and `general.alignment`, and maps its fields.
pub(crate) fn walk_header(path: &Path) -> Result<HeaderMap> {
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut w = Walker {
        r: BufReader::new(file),
        pos: 0,
        size,
        long: true,
        map: HeaderMap::default(),
    };
    walk(&mut w).map_err(|reason| match reason {
        Walked::Bad(reason) => bad(path, reason),
        Walked::Error(e) => e,
    })?;
    Ok(w.map)
}

/// The map of a GGUF header's numeric fields, for tests that mutate files.
#[doc(hidden)]
pub fn header_map(path: &Path) -> Result<HeaderMap> {
    walk_header(path)
}

enum Walked {
    Bad(String),
    Error(Error),
}

impl From<String> for Walked {
    fn from(s: String) -> Self {
        Walked::Bad(s)
    }
}

fn walk<R: Read + Seek>(w: &mut Walker<R>) -> std::result::Result<(), Walked> {
    w.skip(4, "magic")?;
    let version = w.u32(Some("version"), "version")?;
    if !(1..=3).contains(&version) {
        return Err(Walked::Bad(format!("unsupported GGUF version {version}")));
    }
    w.long = version >= 2;
    let tensors = w.len(Some("tensor count"), "tensor count")?;
    let entries = w.len(Some("metadata count"), "metadata count")?;
    w.map.boundaries.push(w.pos);
    for e in 0..entries {
        let what = format!("metadata entry {e}");
        let key = w.string(Some(&format!("{what} key length")), &what, true)?;
        let key = key.map(|k| String::from_utf8_lossy(&k).into_owned());
        let label = key.clone().unwrap_or_else(|| what.clone());
        let ty = w.u32(Some(&format!("{label} type")), &what)?;
        let value = w.value(ty, Some(&label), 0, &label)?;
        if key.as_deref() == Some("general.alignment") {
            match value {
                Some(a) if a > 0 && (a as u128).is_power_of_two() && a <= 1 << 30 => {}
                _ => {
                    return Err(Walked::Error(Error::Metadata {
                        key: "general.alignment".into(),
                        reason: format!(
                            "must be a power of two between 1 and 2^30, got {}",
                            value.map_or_else(|| "a non-integer".into(), |a| a.to_string())
                        ),
                    }))
                }
            }
        }
        w.map.boundaries.push(w.pos);
    }
    for t in 0..tensors {
        let what = format!("tensor info {t}");
        let name = w.string(Some(&format!("{what} name length")), &what, true)?;
        let name = name.map_or(what.clone(), |n| String::from_utf8_lossy(&n).into_owned());
        let dims = w.u32(Some(&format!("{name} dims")), &name)?;
        if dims > MAX_DIMS {
            return Err(Walked::Error(Error::Tensor {
                name,
                reason: format!("{dims} dimensions, at most {MAX_DIMS}"),
            }));
        }
        for d in 0..dims {
            w.len(Some(&format!("{name} dim {d}")), &name)?;
        }
        w.u32(Some(&format!("{name} type")), &name)?;
        w.u64(Some(&format!("{name} offset")), &name)?;
        w.map.boundaries.push(w.pos);
    }
    Ok(())
}

/// Checks each tensor of `content` with checked arithmetic: its element count, its
/// byte size for its storage type and its end offset within the `file_size` bytes.
pub(crate) fn check_tensors(
    path: &Path,
    content: &gguf_file::Content,
    file_size: u64,
) -> Result<()> {
    for (name, t) in &content.tensor_infos {
        let fail = |reason: String| Error::Tensor {
            name: name.clone(),
            reason,
        };
        let dims = t.shape.dims();
        let elems = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| fail(format!("dims {dims:?}: the element count overflows")))?;
        let block = t.ggml_dtype.block_size();
        if block == 0 || elems % block != 0 {
            return Err(fail(format!(
                "{elems} elements are not a whole number of {:?} blocks of {block}",
                t.ggml_dtype
            )));
        }
        let bytes = (elems / block)
            .checked_mul(t.ggml_dtype.type_size())
            .and_then(|b| u64::try_from(b).ok())
            .ok_or_else(|| fail(format!("dims {dims:?}: the byte size overflows")))?;
        let end = content
            .tensor_data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(bytes))
            .ok_or_else(|| fail(format!("offset {} overflows", t.offset)))?;
        if end > file_size {
            return Err(Error::Truncated {
                path: path.to_path_buf(),
                expected: end,
                actual: file_size,
            });
        }
        if matches!(t.ggml_dtype, GgmlDType::F32 | GgmlDType::F16) && dims.is_empty() {
            return Err(fail("no dimensions".into()));
        }
    }
    Ok(())
}

/// Checks that the special token ids of the metadata (BOS, EOS, EOT, padding,
/// unknown, separator) are below `vocab` (the embedding's rows and the tokens
/// array's length): the tokenizer and the grammar engine index with them.
pub(crate) fn check_special_tokens(content: &gguf_file::Content, vocab: usize) -> Result<()> {
    let texts = content
        .metadata
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map_or(0, Vec::len);
    let limit = vocab.min(texts);
    for key in [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.seperator_token_id",
    ] {
        let Some(v) = content.metadata.get(key) else {
            continue;
        };
        let id = v
            .to_u32()
            .map(u64::from)
            .or_else(|_| v.to_u64())
            .or_else(|_| v.to_i32().map(|x| x as i64 as u64))
            .map_err(|e| Error::Metadata {
                key: key.into(),
                reason: e.to_string(),
            })?;
        if id >= limit as u64 {
            return Err(Error::Metadata {
                key: key.into(),
                reason: format!(
                    "token id {id} is outside the vocabulary ({vocab} embedding rows, {texts} token texts)"
                ),
            });
        }
    }
    Ok(())
}
