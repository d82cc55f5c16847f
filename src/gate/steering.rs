//! Kernel steering: one UDP socket per shard in an `SO_REUSEPORT` group,
//! bound in shard order, with a classic-BPF program (the twin of
//! [`crate::route::route`], built by [`crate::route::bpf_program`]) attached
//! to the group, so the kernel delivers each datagram to the socket of its
//! TxID's owner shard: no cross-core hop.
//!
//! The program's return value indexes the group's sockets in bind order, so
//! the sockets must be bound 0..n-1 in shard order and all kept open (closing
//! one moves the last into its place).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

use crate::route::{RouteError, SockFilter, bpf_program};

/// Why steering could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("binding shard {shard}'s socket to {addr}: {source}")]
    Bind {
        shard: usize,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error(
        "another socket is bound to {addr} (another txgate still running?): the shards' \
         SO_REUSEPORT group must be theirs alone, or it would take a share of the datagrams"
    )]
    Taken { addr: SocketAddr },
    #[error(transparent)]
    Program(#[from] RouteError),
    #[error("the kernel refused the steering program (SO_ATTACH_REUSEPORT_CBPF): {0}")]
    Attach(io::Error),
}

/// Binds `shards` UDP sockets to `addr` as one `SO_REUSEPORT` group, in
/// shard order. Port 0 picks a free port for the first and binds the rest to
/// it. The group must be this gate's alone: a socket already on the address
/// (another gate still draining, say) would take a share of the datagrams
/// and shift every shard's index, so that is refused.
pub fn reuseport_group(addr: SocketAddr, shards: usize) -> Result<Vec<UdpSocket>, SteeringError> {
    // A probe without SO_REUSEPORT binds only where no socket is, reuseport
    // or not; on port 0 it also picks the port, one nobody holds.
    let probe = UdpSocket::bind(addr).map_err(|source| match source.kind() {
        io::ErrorKind::AddrInUse => SteeringError::Taken { addr },
        _ => SteeringError::Bind {
            shard: 0,
            addr,
            source,
        },
    })?;
    let mut addr = probe.local_addr().unwrap_or(addr);
    drop(probe);
    let mut group = Vec::with_capacity(shards);
    for shard in 0..shards {
        let bind = |addr: SocketAddr| -> io::Result<Socket> {
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            s.set_reuse_port(true)?;
            s.bind(&addr.into())?;
            Ok(s)
        };
        let s = bind(addr).map_err(|source| SteeringError::Bind {
            shard,
            addr,
            source,
        })?;
        if shard == 0 {
            addr = s
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .unwrap_or(addr);
        }
        group.push(UdpSocket::from(s));
    }
    Ok(group)
}

/// Attaches the route program to the group `socket` belongs to: datagrams
/// go to socket `route(payload[offset..offset + len], shards)`; datagrams too
/// short to hold a TxID go to `short_shard`, which counts and drops them.
pub fn attach_route_program(
    socket: &UdpSocket,
    offset: usize,
    txid_len: usize,
    shards: u32,
    short_shard: u32,
) -> Result<(), SteeringError> {
    let program = bpf_program(offset, txid_len, shards, short_shard)?;
    attach(socket, &program).map_err(SteeringError::Attach)
}

fn attach(socket: &UdpSocket, program: &[SockFilter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        // `SockFilter` is `repr(C)` with the kernel's `sock_filter` layout.
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the
    // kernel copies the instructions during setsockopt and keeps no pointer.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &prog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::route;
    use std::time::{Duration, Instant};

    const _: () =
        assert!(std::mem::size_of::<SockFilter>() == std::mem::size_of::<libc::sock_filter>());

    /// Every datagram arrives on the socket `route` names; short ones on the
    /// short shard.
    #[test]
    fn the_kernel_delivers_each_datagram_to_its_txids_owner() {
        let shards = 4;
        let group = reuseport_group("127.0.0.1:0".parse().unwrap(), shards).unwrap();
        let (offset, len) = (2, 16);
        attach_route_program(&group[0], offset, len, shards as u32, 0).unwrap();
        let dest = group[0].local_addr().unwrap();
        for s in &group {
            assert_eq!(s.local_addr().unwrap(), dest, "one group, one port");
            s.set_nonblocking(true).unwrap();
        }
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut want = vec![0usize; shards];
        let mut seed = 42u64;
        for i in 0..400u32 {
            let mut pkt = vec![0u8; offset + len + 8];
            for b in pkt.iter_mut() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (seed >> 56) as u8;
            }
            pkt[..4].copy_from_slice(&i.to_be_bytes()); // bytes 2..4 are TxID too
            want[route(&pkt[offset..offset + len], shards as u32) as usize] += 1;
            tx.send_to(&pkt, dest).unwrap();
        }
        // Three short datagrams: the short shard (0) gets them.
        for n in [0usize, 5, offset + len - 1] {
            tx.send_to(&vec![7u8; n], dest).unwrap();
        }
        want[0] += 3;
        let mut got = vec![0usize; shards];
        let mut buf = [0u8; 128];
        let end = Instant::now() + Duration::from_secs(5);
        while got.iter().sum::<usize>() < 403 && Instant::now() < end {
            for (shard, s) in group.iter().enumerate() {
                while let Ok(n) = s.recv(&mut buf) {
                    if n >= offset + len {
                        assert_eq!(
                            route(&buf[offset..offset + len], shards as u32) as usize,
                            shard,
                            "a datagram landed on a shard that does not own its TxID"
                        );
                    } else {
                        assert_eq!(shard, 0, "short datagram off the short shard");
                    }
                    got[shard] += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(got, want);
    }

    #[test]
    fn an_address_another_socket_holds_is_refused_not_joined() {
        // A reuseport socket of the same user: the kernel would let the
        // group join it, and datagrams would go to it and to wrong shards.
        let other = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        other.set_reuse_port(true).unwrap();
        other
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let taken = other.local_addr().unwrap().as_socket().unwrap();
        match reuseport_group(taken, 2) {
            Err(SteeringError::Taken { addr }) => assert_eq!(addr, taken),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("joined another socket's group"),
        }
        // Free again: it binds there.
        drop(other);
        let group = reuseport_group(taken, 2).unwrap();
        assert_eq!(group[1].local_addr().unwrap(), taken);
    }
}
