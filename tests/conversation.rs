//! A conversation's turn costs the same whatever its history: the prompt of the new
//! messages comes from a rendered window, not from the whole conversation, and it is
//! exactly what rendering the whole conversation would add.

mod common;

use std::time::Instant;

use common::*;
use troupe::agent::{Conversation, SyncWork};
use troupe::model::{Message, WeightsMode};

/// Runs `turns` turns of a conversation without a model call: each turn a user
/// message of the same length, then a reply of the same length (its tokens as the
/// model would have produced them, end token included). Returns each turn's sync work
/// and time.
fn drive(turns: usize) -> (Conversation, Vec<(SyncWork, f64)>) {
    let model = tiny(WeightsMode::Native);
    let tok = model.tokenizer();
    let end = tok.token_id("<|im_end|>").expect("end token");
    let mut conv = Conversation::new(vec![Message::system("You answer briefly.")]);
    let mut work = Vec::new();
    for t in 0..turns {
        conv.push(Message::user(format!("Question number {t:03}?")));
        let mut undo = conv.undo_point();
        let start = Instant::now();
        let w = conv.sync(&model, &mut undo).unwrap();
        work.push((w, start.elapsed().as_secs_f64() * 1e6));
        let text = format!("Answer number {t:03}.");
        let mut reply = tok.encode(&text).unwrap();
        reply.push(end);
        conv.record_reply(&model, &reply, text).unwrap();
    }
    // The log is what rendering and tokenizing the whole conversation gives.
    let full = model
        .chat_template()
        .render(conv.messages(), false)
        .unwrap();
    let mut expected = tok.encode_prompt(&full).unwrap();
    // The rendering closes the last reply with a newline the log does not hold yet
    // (it comes with the next prompt).
    let log = conv.log().to_vec();
    assert_eq!(
        &expected[..log.len()],
        &log[..],
        "log differs from the full rendering"
    );
    expected.truncate(log.len());
    eprintln!(
        "after {turns} turns the whole conversation renders to {} bytes, {} tokens",
        full.len(),
        log.len()
    );
    (conv, work)
}

#[test]
fn turn_forty_costs_what_turn_two_costs() {
    let (conv, work) = drive(40);
    assert_eq!(conv.messages().len(), 1 + 2 * 40);
    // The first turn renders the whole (short) conversation; every later one a window.
    assert!(!work[0].0.windowed);
    for (i, (w, _)) in work.iter().enumerate().skip(1) {
        assert!(w.windowed, "turn {}: {w:?}", i + 1);
        assert!(!w.mismatch);
        assert_eq!(
            (w.rendered_bytes, w.tokenized_bytes, w.appended_tokens),
            (
                work[1].0.rendered_bytes,
                work[1].0.tokenized_bytes,
                work[1].0.appended_tokens
            ),
            "turn {} did more work than turn 2",
            i + 1
        );
    }
    let us = |i: usize| work[i].1;
    eprintln!(
        "sync time: turn 2 {:.0} µs, turn 40 {:.0} µs (rendered {} bytes each)",
        us(1),
        us(39),
        work[1].0.rendered_bytes
    );
}

/// A template that re-renders the history differently from what the model wrote
/// (it trims replies): the next prompt disagrees with the log, so the log is cut to
/// the longest common prefix and the rest re-tokenized, and the mismatch is counted.
#[test]
fn a_history_rendered_differently_is_cut_to_the_common_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trimming.gguf");
    let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    troupe::model::tiny::write_tiny_model(
        &path,
        &troupe::model::tiny::TinyConfig {
            chat_template: Some(template.into()),
            ..Default::default()
        },
    )
    .unwrap();
    let model = troupe::Model::load(&path, Default::default()).unwrap();
    let tok = model.tokenizer();
    let end = tok.token_id("<|im_end|>").unwrap();
    let mut conv = Conversation::new(vec![Message::system("Be brief.")]);
    conv.push(Message::user("Hello?"));
    let mut undo = conv.undo_point();
    let first = conv.sync(&model, &mut undo).unwrap();
    assert!(!first.mismatch);
    let prompt_len = conv.log().len();
    // The model wrote a reply with a leading space, which the template trims away.
    let text = "  Hi there.";
    let mut reply = tok.encode(text).unwrap();
    reply.push(end);
    conv.record_reply(&model, &reply, text.into()).unwrap();
    conv.push(Message::user("And then?"));
    let mut undo = conv.undo_point();
    let second = conv.sync(&model, &mut undo).unwrap();
    assert!(second.mismatch && !second.windowed, "{second:?}");
    let full = model.chat_template().render(conv.messages(), true).unwrap();
    assert_eq!(conv.log(), &tok.encode_prompt(&full).unwrap()[..]);
    // The prompt of the first turn is still a common prefix; the reply's tokens past
    // the point of disagreement were replaced.
    assert!(conv.log().len() > prompt_len);
    assert_ne!(
        &conv.log()[prompt_len..prompt_len + reply.len()],
        &reply[..]
    );
    // A rollback puts the reply's own tokens back.
    conv.rollback(undo);
    assert_eq!(&conv.log()[prompt_len..], &reply[..]);
}
