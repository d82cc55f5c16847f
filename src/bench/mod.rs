//! `txgate bench`: the per-core claim latency benchmark.

pub mod report;
