//! The llumlet data plane: the shared-memory interface between an engine and its llumlet.
//!
//! - [`segment`]: the per-instance control segment (naming, header, create and attach states);
//! - [`sealed`]: shared memory that cannot be truncated under a mapping, found through a locator;
//! - [`status_ring`]: the single-writer, many-reader status ring with a seqlock per slot;
//! - [`kv`]: the KV region registry and mapping of host regions;
//! - [`request_table`]: one seqlocked slot per live request with its block table;
//! - `seqlock` (inside): the atomic-word copy both sides use;
//! - [`command`]: the two SPSC command queues and the command codec;
//! - [`endpoint`]: the engine's endpoint (create the segment, publish);
//! - [`fault`]: fault injection at protocol points for the process-level fault tests;
//! - [`mailbox`]: per-migration files for request ids and serialized request state;
//! - [`runs`]: block pairs to coalesced copy runs, and stage deltas;
//! - [`rng`]: a small seeded generator (tests, benches and the simulated engine);
//! - [`sys`]: the operating-system calls outside the segment's mapping (liveness, clock, host);
//! - [`transport`]: the KV transport trait, `shm` and `tcp`, and the transfer connection's frames;
//! - `ucx` (feature `ucx`): the UCX transport over `ucx-sys`;
//! - `cuda` (feature `cuda`): CUDA IPC, device copies and the engine's GPU KV cache.
//!
//! Nothing here depends on tokio; nothing on the hot paths allocates or locks.

#![warn(missing_docs)]

pub mod aead;
pub mod command;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod endpoint;
pub mod fault;
pub mod kv;
pub mod mailbox;
pub mod request_table;
pub mod rng;
pub mod runs;
pub mod sealed;
pub mod segment;
mod seqlock;
pub mod status_ring;
mod sync;
pub mod sys;
pub mod transport;
#[cfg(feature = "ucx")]
pub mod ucx;
