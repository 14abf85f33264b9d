//! The atomics of the shared-memory structures: std's, or loom's when the crate is built with
//! `--cfg loom` to model-check the seqlock and the queues (`scripts/test.sh` runs those models).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
