//! The llumlet: the engine-side agent of Llumnix, wire-compatible with the Python llumlet.
//!
//! - [`config`] and [`env`]: configuration from the environment, validated at start;
//! - [`cms`]: the CMS (Redis) writer;
//! - [`status`]: status sources, completion, metric mask, unschedulable fallback;
//! - [`service`]: the `llumlet.Llumlet` gRPC service;
//! - [`migrate`]: `Migrate` parameters, slots, and the [`migrate::Migrator`] seam;
//! - [`engine`]: the [`engine::Engine`] seam the handlers call;
//! - [`agent`]: the running llumlet and its lifecycle;
//! - [`start`]: the `llumlet` process, from the environment to a graceful stop;
//! - [`metrics`]: Prometheus metrics.

#![forbid(unsafe_code)]

pub mod agent;
pub mod cms;
pub mod config;
pub mod engine;
pub mod env;
pub mod kv_transfer;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod migration;
pub mod net;
pub mod pyrepr;
pub mod ring_source;
pub mod selection;
pub mod service;
pub mod start;
pub mod status;
mod sync;
