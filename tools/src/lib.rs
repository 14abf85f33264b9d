//! The `llumlet` binary's library: its command line, and the tools that are not the agent.
//!
//! - [`cli`]: the command line (`llumlet` with no subcommand runs the agent, [`llumlet::start`]);
//! - [`sim`]: the simulated decode engine (`llumlet sim-engine`), the only engine the tests need;
//! - [`demo`]: a local cluster rebalanced by live migrations (`llumlet demo`);
//! - [`bench`]: the measuring tools (`llumlet bench`), one JSON line per measurement.
//!
//! None of this is linked into an engine (`llumlet-dataplane`, `llumlet-ffi`) or into the agent
//! library (`llumlet`).

#![warn(missing_docs)]

pub mod bench;
pub mod cli;
pub mod demo;
pub mod sim;
