//! The tokenizer tokenizes as llama.cpp does on the default model (no added prefix
//! space, specials as single tokens), round-trips text, and the incremental
//! detokenizer streams exactly the full decode.

mod common;

use common::*;
use troupe::model::WeightsMode;
use troupe::{IncrementalDecoder, Tokenizer};

const TEXTS: &[&str] = &[
    "Hello, world!",
    "The end.",
    "  leading spaces and trailing   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "Ünïcödé: naïve café, Straße, 東京, Москва",
    "emoji 🦀🚀👩‍👩‍👧 and ✓",
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
    "numbers 12345 and 3.14159",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
];

fn check_round_trips(tok: &Tokenizer) {
    for text in TEXTS {
        let ids = tok.encode(text).unwrap();
        assert_eq!(&tok.decode(&ids).unwrap(), text, "round trip of {text:?}");
        // Streaming token by token yields the same text, each piece whole UTF-8.
        let mut dec = IncrementalDecoder::new();
        let mut streamed = String::new();
        for &id in &ids {
            streamed.push_str(&dec.push(tok, id).unwrap());
        }
        streamed.push_str(&dec.finish());
        assert_eq!(&streamed, text, "streamed decode of {text:?}");
    }
}

#[test]
fn tiny_tokenizer_round_trips_and_streams() {
    check_round_trips(tiny(WeightsMode::Native).tokenizer());
}

#[test]
fn incremental_decoder_holds_back_partial_characters() {
    let model = tiny(WeightsMode::Native);
    let tok = model.tokenizer();
    // The tiny vocabulary has no multi-byte merges: "🦀" is four byte tokens.
    let ids = tok.encode("🦀").unwrap();
    assert_eq!(ids.len(), 4);
    let mut dec = IncrementalDecoder::new();
    let pieces: Vec<String> = ids.iter().map(|&i| dec.push(tok, i).unwrap()).collect();
    assert_eq!(pieces, vec!["", "", "", "🦀"]);
    // A cut-off character at the end of the stream becomes one replacement char,
    // as the full decode does.
    let mut dec = IncrementalDecoder::new();
    let mut s = dec.push(tok, ids[0]).unwrap();
    s.push_str(&dec.push(tok, ids[1]).unwrap());
    s.push_str(&dec.finish());
    assert_eq!(s, tok.decode(&ids[..2]).unwrap());
    assert_eq!(s, "\u{FFFD}");
}

#[test]
fn default_model_tokenizes_like_llama_cpp() {
    let model = real(WeightsMode::Native);
    let tok = model.tokenizer();
    assert_eq!(tok.encode("The end.").unwrap(), vec![504, 1112, 30]);
    assert_eq!(tok.encode("Hello, world!").unwrap().len(), 4);
    // Special tokens are single tokens, and no space is invented after them.
    let im_start = tok.token_id("<|im_start|>").unwrap();
    let im_end = tok.token_id("<|im_end|>").unwrap();
    assert_eq!(tok.encode("<|im_end|>\n").unwrap(), vec![im_end, 198]);
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
    assert_eq!(ids.first(), Some(&im_start));
    assert_eq!(ids.last(), Some(&im_end));
    assert_eq!(tok.decode(&ids[1..2]).unwrap(), "user");
    // Digits are split one by one (SmolLM's pre-tokenizer).
    assert_eq!(tok.encode("2024").unwrap().len(), 4);
    assert!(tok.eos_token_ids().contains(&im_end));
    check_round_trips(tok);
}
