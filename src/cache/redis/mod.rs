//! The Redis-protocol backend (work in progress): RESP codec first.

pub mod resp;
