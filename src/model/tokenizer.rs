//! The tokenizer, built from a GGUF's metadata on the `tokenizers` crate, with the
//! pre-tokenizer the GGUF's `tokenizer.ggml.pre` names; and an incremental
//! detokenizer that streams text without ever emitting a broken UTF-8 sequence.
//!
//! candle's `TokenizerFromGguf` builds the BPE model and the special tokens; we
//! replace its pre-tokenizer, because for most `pre` values it falls back to GPT-2's
//! byte-level splitting *with* a prefix space (" The" instead of "The"), which is not
//! how llama.cpp, or the model's training, tokenizes.

use std::collections::HashSet;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use crate::{Error, Result};

/// GPT-2's word split, as llama.cpp spells it.
const REGEX_GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's word split (digits in runs of at most three).
const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's word split (single digits).
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token texts that end a turn in common chat formats, treated as end-of-generation
/// when the vocabulary has them as control tokens (as llama.cpp does).
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
];

/// A byte-level BPE tokenizer read from a GGUF.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Raw bytes of each token (special tokens: their text).
    bytes: Vec<Vec<u8>>,
    /// Token texts as stored in the vocabulary.
    texts: Vec<String>,
    special: HashSet<u32>,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    pre: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.bytes.len())
            .field("pre", &self.pre)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    ct.metadata.get(key)?.to_u32().ok()
}

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` value, without the
/// GPT-2 prefix space.
fn pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(
            SplitPattern::Regex(re.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex: {e}")))?
        .into())
    };
    let no_regex = ByteLevel::new(false, false, false);
    Ok(match pre {
        // Digits one by one, then GPT-2's split.
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva" => (
            Sequence::new(vec![split(r"\p{N}")?, split(REGEX_GPT2)?, no_regex.into()]).into(),
            false,
        ),
        "llama3" | "llama-bpe" | "smaug-bpe" | "lfm2" => (
            Sequence::new(vec![split(REGEX_LLAMA3)?, no_regex.into()]).into(),
            false,
        ),
        "qwen2" => (
            Sequence::new(vec![split(REGEX_QWEN2)?, no_regex.into()]).into(),
            true,
        ),
        // "gpt2", "default" and anything unknown: GPT-2's split.
        _ => (
            Sequence::new(vec![split(REGEX_GPT2)?, no_regex.into()]).into(),
            false,
        ),
    })
}

/// GPT-2's byte-level alphabet: the printable stand-in character of each byte
/// (bytes that are not printable map to U+0100 onwards, in order).
pub(crate) fn byte_chars() -> Vec<char> {
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if matches!(b, 33..=126 | 161..=172 | 174..=255) {
                char::from(b)
            } else {
                let c = char::from_u32(next).unwrap_or('\u{FFFD}');
                next += 1;
                c
            }
        })
        .collect()
}

/// The byte each stand-in character of [`byte_chars`] represents.
fn unicode_to_byte() -> std::collections::HashMap<char, u8> {
    byte_chars().into_iter().zip(0..=255u8).collect()
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_gguf(ct)
            .map_err(|e| Error::Tokenizer(format!("from GGUF metadata: {e}")))?;
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "gpt2".into());
        let (pt, nfc) = pre_tokenizer(&pre)?;
        inner.with_pre_tokenizer(Some(pt));
        if nfc {
            inner
                .with_normalizer(Some(NFC))
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
        }
        inner.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
        inner.with_post_processor(None::<tokenizers::processors::PostProcessorWrapper>);

        let texts: Vec<String> = ct
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| Error::Metadata {
                key: "tokenizer.ggml.tokens".into(),
                reason: "missing or not an array".into(),
            })?
            .iter()
            .map(|v| v.to_string().cloned().unwrap_or_default())
            .collect();
        let types: Vec<u32> = ct
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|a| {
                a.iter()
                    .map(|v| {
                        v.to_i32()
                            .map(|x| x as u32)
                            .or_else(|_| v.to_u32())
                            .unwrap_or(1)
                    })
                    .collect()
            })
            .unwrap_or_else(|| vec![1; texts.len()]);
        // Control tokens (`<|im_end|>`) are special; user-defined ones (type 4, Qwen's
        // `<tool_call>`) are matched in text like them but are ordinary text to a
        // grammar, as llama.cpp treats them, so that a grammar's literal
        // `<tool_call>` accepts the model's own token for it.
        let special: HashSet<u32> = inner
            .get_added_tokens_decoder()
            .keys()
            .copied()
            .filter(|&id| types.get(id as usize).copied() != Some(4))
            .collect();
        let map = unicode_to_byte();
        let bytes = texts
            .iter()
            .enumerate()
            .map(|(id, t)| {
                if special.contains(&(id as u32)) {
                    t.as_bytes().to_vec()
                } else {
                    t.chars()
                        .flat_map(|c| match map.get(&c) {
                            Some(&b) => vec![b],
                            None => c.to_string().into_bytes(),
                        })
                        .collect()
                }
            })
            .collect();
        let bos = meta_u32(ct, "tokenizer.ggml.bos_token_id");
        let mut eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| meta_u32(ct, k))
            .collect();
        for (id, t) in texts.iter().enumerate() {
            let control = types.get(id).copied() == Some(3);
            if control && END_OF_TURN.contains(&t.as_str()) && !eos.contains(&(id as u32)) {
                eos.push(id as u32);
            }
        }
        let add_bos = ct
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        Ok(Self {
            inner,
            bytes,
            texts,
            special,
            bos,
            eos,
            add_bos,
            pre,
        })
    }

    /// Token ids of `text`. Special-token texts (`<|im_start|>`…) become their single
    /// token; no BOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Token ids of a whole prompt: [`encode`](Self::encode), with the BOS token first
    /// when the GGUF asks for one (`tokenizer.ggml.add_bos_token`).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// The text of `ids`, special tokens included. Invalid UTF-8 (a multi-byte
    /// character cut off) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut buf = Vec::new();
        for &id in ids {
            buf.extend_from_slice(self.token_bytes(id)?);
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// The raw bytes a token stands for.
    pub fn token_bytes(&self, id: u32) -> Result<&[u8]> {
        self.bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .ok_or(Error::TokenOutOfRange {
                id,
                vocab_size: self.bytes.len(),
            })
    }

    /// The token's text as the vocabulary stores it (lossy for partial bytes).
    pub fn token_text(&self, id: u32) -> String {
        match self.bytes.get(id as usize) {
            Some(b) => String::from_utf8_lossy(b).into_owned(),
            None => String::new(),
        }
    }

    /// The id of a token given its vocabulary text (`"<|im_end|>"`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.texts.iter().position(|t| t == text).map(|i| i as u32)
    }

    /// Whether `id` is a special (control) token; user-defined tokens such as
    /// `<tool_call>` are not (they stand for their text).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// Tokens that end a generation: the GGUF's EOS and end-of-turn tokens.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The GGUF's `tokenizer.ggml.pre` (how text is split before BPE).
    pub fn pretokenizer(&self) -> &str {
        &self.pre
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Turns a stream of token ids into text pieces that are always whole UTF-8: bytes of
/// a character split across tokens are held back until the character is complete.
///
/// The concatenation of every piece and [`finish`](Self::finish) equals
/// [`Tokenizer::decode`] of the whole stream.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.pending.extend_from_slice(tokenizer.token_bytes(id)?);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return Ok(out);
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safe: from_utf8 vouched for the first `valid` bytes.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return Ok(out);
                        }
                        // Bytes that can never start a character: as a lossy decode does.
                        Some(n) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + n);
                        }
                    }
                }
            }
        }
    }

    /// Flushes what is left at the end of the stream (an incomplete character
    /// becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
