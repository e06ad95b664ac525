//! troupe: a runtime for LLM agents built on actors.
//!
//! Each agent owns its conversation and its KV cache; one model actor per loaded
//! model batches the agents' generation requests into a ragged batched forward.
//!
//! # Layout
//! - [`model`]: GGUF loading, the llama-family ragged batched forward, tokenizer,
//!   chat template, default-model fetch.
//! - [`kv`]: the per-sequence [`KvCache`].
//! - [`sampling`]: sampling parameters and the per-sequence sampler.
//! - [`engine`]: the [`ModelActor`](engine::ModelActor): continuous batching, sampling,
//!   streaming, cancellation and the KV budget, on a dedicated engine thread.
//! - [`agent`]: the [`AgentActor`](agent::AgentActor): conversation, token log and KV
//!   cache owned per agent, tools, fork, snapshots, eviction.
//! - [`grammar`]: output grammars (regex, JSON Schema, Lark, choice) compiled by
//!   llguidance, applied per sequence while decoding.
//! - [`workflow`]: pipelines, fan-out/gather, routing, group chats, agents as tools,
//!   forked exploration.
//! - [`loadtest`]: `troupe loadtest`, agents in closed loops and the report.
//! - [`bench`]: the `troupe bench` measurements.
//! - [`error`]: the library's [`Error`].
//! - [`math`]: vectorised `exp` and the MLP activation.
//!
//! # Invariants
//! - A [`KvCache`] is owned by exactly one agent or one in-flight request; the
//!   forward borrows it mutably and appends the keys and values of the new tokens.
//! - Under a model actor, only its engine thread runs the forward, never a tokio
//!   worker.
//! - A sequence's logits do not depend on which other sequences share its batch
//!   (bitwise with a fixed [`WeightsMode`]).
#![warn(missing_docs)]
#![deny(clippy::unwrap_used)]

pub mod agent;
pub mod bench;
pub mod engine;
pub mod error;
pub mod grammar;
pub mod kv;
pub mod loadtest;
pub mod math;
pub mod model;
pub mod sampling;
pub mod stats;
pub mod workflow;

pub use engine::{
    Done, EngineConfig, Event, FinishReason, Generate, GenerationStream, GetStats, ModelActor,
    Stats, Usage,
};
pub use error::{Error, Result};
pub use kv::{KvCache, KvDtype, KvLayout};
pub use model::chat::{ChatTemplate, Message, Role};
pub use model::tokenizer::{IncrementalDecoder, Tokenizer};
pub use model::{Model, ModelInfo, SeqInput, WeightsMode};
