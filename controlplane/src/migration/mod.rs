//! Live migration, one room per concern:
//!
//! - [`auth`]: the transfer connection's mutual authentication (before any protocol message);
//! - [`machine`]: the pure protocol machines of both sides (no I/O, tested with a fault at every
//!   action);
//! - [`negotiate`]: which transport a migration takes (pure);
//! - [`reason`]: why a migration ended short, typed (its text goes in `Abort.reason`);
//! - [`wire`]: the transfer connection's control messages, region descriptions and `Resolve`;
//! - [`source`]: the source side of one migration, driving its machine;
//! - [`endpoint`]: the destination's transfer endpoint, driving a machine per migration in;
//! - [`rpc`]: what the gRPC `Migrate` call asks (parameters), the slots it takes, the seam;
//! - [`migrator`]: what the gRPC `Migrate` handler calls: selection, destination, the source runs;
//! - [`link`]: calls to the engine over its command queues;
//! - [`journal`]: the durable records that settle migrations a dead or in-doubt llumlet left;
//! - [`ucx_side`], [`cuda_side`]: this llumlet's UCX and CUDA IPC transports, when built in.

use std::time::Duration;

pub mod auth;
pub mod cuda_side;
pub mod endpoint;
pub mod journal;
pub mod link;
pub mod machine;
pub mod migrator;
pub mod negotiate;
pub mod reason;
pub mod rpc;
pub mod source;
pub mod ucx_side;
pub mod wire;

#[cfg(test)]
mod tests;

/// How long one protocol step may wait for the peer or the engine.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a source waits, after losing the destination, before asking it how the migration
/// ended (it may still be finishing the step that was cut).
pub const RESOLVE_PAUSE: Duration = Duration::from_millis(200);
