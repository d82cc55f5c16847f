//! txgate: a thread-per-core TxID dedup engine.

pub mod admin;
pub mod bench;
pub mod cache;
pub mod clock;
pub mod engine;
pub mod framestore;
pub mod gate;
pub mod hugepages;
pub mod identity;
pub mod metrics;
pub mod pipeline;
pub mod route;
pub mod tier1;
pub mod txidset;
pub mod units;
