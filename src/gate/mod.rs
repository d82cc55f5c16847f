//! The UDP ingress gate (work in progress): so far the kernel steering
//! that puts each datagram on its TxID's owner shard.

pub mod steering;
