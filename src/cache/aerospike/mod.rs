//! The Aerospike backend (Community Edition), work in progress.
//!
//! So far only [`codec`]: the sans-I/O wire protocol (record digests and
//! partitions, AS_MSG requests and replies, the info protocol and the
//! cluster-tending values). Connections, routing and the shard handle come
//! next, as thin layers over it.

pub mod codec;
