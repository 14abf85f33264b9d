//! Benchmarks of llumlet-rs: criterion benches in `benches/`, and measuring tools in `src/bin/`
//! that compare against a baseline measured in the same run (see docs/BENCHMARKS.md).
