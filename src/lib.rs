//! troupe: a runtime for LLM agents built on actors.
//!
//! Each agent owns its conversation and its KV cache; one model actor per loaded
//! model batches the agents' generation requests into a ragged batched forward.
//!
//! # Layout
//! Modules stand on floors; each imports only from its own floor or below
//! (`ARCHITECTURE.md` has the code map and the sequence of one turn;
//! `tests/floors.rs` enforces the floors).
//! - floor 0: [`kv`] (the per-sequence [`KvCache`]), [`sampling`] (sampling and
//!   [`TokenConstraint`](sampling::TokenConstraint)), [`error`], [`stats`] (one
//!   [`Quantiles`](stats::Quantiles) type), [`math`] (vectorised `exp`, the MLP
//!   activation).
//! - floor 1: [`model`] (GGUF loading, the ragged batched forward, kernels, tokenizer,
//!   chat template, fetch) and [`grammar`] (regex, JSON Schema, Lark, choice, compiled
//!   by llguidance).
//! - floor 2: [`engine`]: the [`Engine`] handle, the
//!   [`ModelActor`], the scheduler, the engine thread, the cache
//!   lease and the one per-sequence decode state.
//! - floor 3: [`agent`]: the [`AgentActor`](agent::AgentActor) around a plain
//!   [`Conversation`](agent::Conversation).
//! - floor 4: [`workflow`], [`loadtest`], [`bench`], [`mcp`] (agents offered as
//!   MCP tools).
//!
//! # Invariants
//! - A [`KvCache`] is owned by exactly one agent or one in-flight request; the
//!   forward borrows it mutably and appends the keys and values of the new tokens.
//! - Under a model actor, only its engine thread runs the forward, never a tokio
//!   worker.
//! - The engine owns the accounting of KV bytes, the agent owns the bytes; a
//!   [`LeasedCache`](engine::LeasedCache) ties the two.
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
pub mod mcp;
pub mod model;
pub mod sampling;
pub mod serve;
pub mod stats;
pub mod workflow;

pub use engine::{
    Done, Engine, EngineConfig, Event, FinishReason, Generate, GenerationStream, GetStats,
    ModelActor, Stats, Usage,
};
pub use error::{Error, Result};
pub use kv::{KvCache, KvDtype, KvLayout};
pub use model::chat::{ChatTemplate, Message, Role};
pub use model::tokenizer::{IncrementalDecoder, Tokenizer};
pub use model::{Model, ModelInfo, SeqInput, WeightsMode};
