//! Live migration: the pure protocol machines ([`machine`]), the link to the engine's command
//! queues ([`link`]), the drivers that run them over real connections ([`driver`]), and the
//! source's journal that settles migrations a dead or in-doubt llumlet left behind ([`journal`]).

pub mod cuda_side;
pub mod driver;
pub mod journal;
pub mod link;
pub mod machine;
pub mod ucx_side;
