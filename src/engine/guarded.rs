//! Code that runs under `catch_unwind` on the engine thread: the forward of a step and
//! the requester-supplied constraint callbacks, so that a panic fails the sequences
//! involved with a named error instead of killing the thread that serves everyone.

use crate::model::{Model, SeqInput};
use crate::{Error, Result};

/// Runs the forward over `inputs` (each cache `lens[i]` long before the step), under
/// `catch_unwind`: a panic becomes [`Error::EnginePanic`], and on any failure every
/// cache is put back at its length before the step. `panic_on_token` is the test
/// hook that makes a step feeding that token panic.
pub(super) fn forward(
    model: &Model,
    inputs: &mut [SeqInput<'_>],
    lens: &[usize],
    panic_on_token: Option<u32>,
) -> Result<Vec<Vec<f32>>> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Some(t) = panic_on_token {
            if inputs.iter().any(|s| s.tokens.contains(&t)) {
                panic!("test hook: the forward panics on token {t}");
            }
        }
        model.forward(inputs).and_then(|l| Ok(l.to_vec2::<f32>()?))
    }))
    .unwrap_or_else(|p| {
        Err(Error::EnginePanic {
            what: panic_text(p.as_ref()),
        })
    });
    if result.is_err() {
        // A forward that failed half way may have grown some caches.
        for (s, &len) in inputs.iter_mut().zip(lens) {
            if s.cache.len() != len {
                s.cache.truncate(len);
            }
        }
    }
    result
}

/// Runs a requester-supplied constraint callback so that a panic in it fails only
/// that sequence, never the engine thread that serves everyone else.
pub(super) fn guard<T>(f: impl FnOnce() -> crate::Result<T>) -> crate::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Error::Grammar {
            kind: "constraint",
            message: format!("panicked: {}", panic_text(p.as_ref())),
        }),
    }
}

/// The message of a caught panic.
pub(super) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
