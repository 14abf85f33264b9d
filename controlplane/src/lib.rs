//! The llumlet: the engine-side agent of Llumnix, wire-compatible with the Python llumlet.
//!
//! - [`config`] and [`env`]: configuration from the environment, validated at start;
//! - [`cms`]: the CMS (Redis) writer;
//! - [`status`]: status sources, completion, metric mask, unschedulable fallback;
//! - [`service`]: the `llumlet.Llumlet` gRPC service;
//! - [`migrate`]: `Migrate` parameters, slots, and the [`migrate::Migrator`] seam;
//! - [`engine`]: the [`engine::Engine`] seam the handlers call;
//! - [`agent`]: the running llumlet and its lifecycle;
//! - [`metrics`]: Prometheus metrics.

pub mod agent;
pub mod bench;
pub mod cli;
pub mod cms;
pub mod config;
pub mod demo;
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
pub mod status;
mod sys;
