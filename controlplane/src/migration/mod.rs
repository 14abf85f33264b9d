//! Live migration: the pure protocol machines ([`machine`]), the link to the engine's command
//! queues ([`link`]), and the drivers that run them over real connections ([`driver`]).

pub mod driver;
pub mod link;
pub mod machine;
