//! The llumlet: the engine-side agent of Llumnix, wire-compatible with the Python llumlet.
//!
//! Public interface:
//! - [`start`]: the `llumlet` process, from the environment to a graceful stop;
//! - [`agent`]: the running llumlet (CMS registration, heartbeat, status, gRPC) and its lifecycle;
//! - [`config`] and [`env`]: configuration from the environment, validated at start;
//! - [`status`]: status sources, completion, metric mask, unschedulable fallback;
//! - [`engine`]: the [`engine::Engine`] seam the gRPC handlers call (the engine's command queue);
//! - [`migration`]: live migration (the machines, the transport negotiation, both sides of the
//!   driver, the journal, the `Migrate` seam and its slots);
//! - [`metrics`]: Prometheus metrics.
//!
//! Inside: `cms` (the CMS writer), `service` (the `llumlet.Llumlet` gRPC service), `ring_source`
//! (the engine's status ring as a status source), `selection` (which requests a `Migrate` moves),
//! `kv_transfer` (`--kv-transfer-config`), `logging`, `net`, `pyrepr` (upstream's message
//! texts), `sync` (locking).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
mod cms;
pub mod config;
pub mod engine;
pub mod env;
mod kv_transfer;
mod logging;
pub mod metrics;
pub mod migration;
mod net;
mod pyrepr;
mod ring_source;
mod rpc_incoming;
mod selection;
mod service;
pub mod start;
pub mod status;
mod sync;
