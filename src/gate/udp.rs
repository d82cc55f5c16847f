//! Batched datagram I/O: `recvmmsg` into fixed slots, `sendmmsg` of borrowed
//! payloads. One syscall moves a whole batch, which is what keeps the gate's
//! CPU per packet near a bare forwarder's.

use std::io;
use std::os::fd::RawFd;

use socket2::SockAddr;

/// Largest UDP payload (IPv4: 65535 − 8 − 20); a slot holds any datagram
/// whole, so nothing is ever forwarded truncated.
pub const SLOT_BYTES: usize = 65_536;
/// Distance between slots: a power-of-two stride would put every slot's
/// first bytes (the ones each packet touches) in the same cache sets, so
/// a batch would evict itself; one extra cache line per slot spreads them.
const SLOT_STRIDE: usize = SLOT_BYTES + 64 * 3;

/// `recvmmsg` slots, allocated once. Holds raw pointers into its own boxes
/// (which never move), so it is `!Send` and lives on its shard.
pub struct RecvBatch {
    bufs: Box<[u8]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    filled: usize,
}

impl RecvBatch {
    /// `slots` datagrams per call (at least 1).
    pub fn new(slots: usize) -> Self {
        let slots = slots.max(1);
        let mut bufs = vec![0u8; slots * SLOT_STRIDE].into_boxed_slice();
        let base = bufs.as_mut_ptr();
        let mut iovs: Box<[libc::iovec]> = (0..slots)
            .map(|i| libc::iovec {
                // SAFETY: `i * SLOT_STRIDE + SLOT_BYTES` ≤ `bufs.len()`
                // (slots * SLOT_STRIDE, and SLOT_STRIDE > SLOT_BYTES).
                iov_base: unsafe { base.add(i * SLOT_STRIDE) }.cast(),
                iov_len: SLOT_BYTES,
            })
            .collect();
        let iov_base = iovs.as_mut_ptr();
        let hdrs = (0..slots)
            .map(|i| {
                // SAFETY: an all-zero msghdr is valid (no name, no control).
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                // SAFETY: `i < slots`, the length of `iovs`.
                h.msg_hdr.msg_iov = unsafe { iov_base.add(i) };
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        Self {
            bufs,
            iovs,
            hdrs,
            filled: 0,
        }
    }

    /// Reads up to a batch without blocking: `Ok(0)` when nothing is queued.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.filled = 0;
        for h in self.hdrs.iter_mut() {
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        debug_assert_eq!(self.iovs.len(), self.hdrs.len());
        // SAFETY: every header points at its own iovec, which points at its
        // own SLOT_BYTES of `bufs`; all live as long as `self`.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(0),
                io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        self.filled = n as usize;
        Ok(self.filled)
    }

    /// Datagrams one read can return.
    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Datagrams from the last [`RecvBatch::recv`].
    pub fn len(&self) -> usize {
        self.filled
    }

    /// Whether the last read returned nothing.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Datagram `i` of the last read.
    #[inline]
    pub fn get(&self, i: usize) -> &[u8] {
        debug_assert!(i < self.filled);
        let len = (self.hdrs[i].msg_len as usize).min(SLOT_BYTES);
        &self.bufs[i * SLOT_STRIDE..i * SLOT_STRIDE + len]
    }
}

/// A batch of outgoing payloads, sent to each target with one `sendmmsg`.
/// Payloads are borrowed by pointer: fill, send, clear, all before the
/// buffers they point into change.
pub struct SendBatch {
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl SendBatch {
    /// Room for `cap` payloads (more grow the vectors).
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            iovs: Vec::with_capacity(cap),
            hdrs: Vec::with_capacity(cap),
        }
    }

    /// Queues `payload`; it must stay alive and unchanged until the next
    /// [`SendBatch::clear`].
    #[inline]
    pub fn push(&mut self, payload: &[u8]) {
        self.iovs.push(libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        });
    }

    /// Payloads queued.
    pub fn len(&self) -> usize {
        self.iovs.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.iovs.is_empty()
    }

    /// Drops the queued payloads.
    pub fn clear(&mut self) {
        self.iovs.clear();
        self.hdrs.clear();
    }

    /// Sends every queued payload through `fd`, a socket connected to its
    /// target (blocking with a send timeout, so a full send buffer is waited
    /// out, boundedly). Returns how many were sent; an error stops the batch.
    pub fn send(&mut self, fd: RawFd) -> (usize, Option<io::Error>) {
        self.send_with(fd, None)
    }

    /// [`SendBatch::send`] on an unconnected socket, to `to`.
    pub fn send_to(&mut self, fd: RawFd, to: &SockAddr) -> (usize, Option<io::Error>) {
        self.send_with(fd, Some(to))
    }

    fn send_with(&mut self, fd: RawFd, to: Option<&SockAddr>) -> (usize, Option<io::Error>) {
        self.hdrs.clear();
        for iov in &mut self.iovs {
            // SAFETY: an all-zero msghdr is valid; the fields set below point
            // at `to` and at `iov`, both alive for the call.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            if let Some(to) = to {
                h.msg_hdr.msg_name = to.as_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_namelen = to.len();
            }
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            self.hdrs.push(h);
        }
        let mut sent = 0;
        let mut eintr = 0;
        // A connected socket reports an earlier ICMP port-unreachable on
        // the next send, which then sends nothing: retry that once.
        let mut refused = 0;
        while sent < self.hdrs.len() {
            // SAFETY: headers `sent..` are initialised above and point at
            // live iovecs and at `to`.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs.as_mut_ptr().add(sent),
                    (self.hdrs.len() - sent) as libc::c_uint,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted && eintr < 8 {
                    eintr += 1;
                    continue;
                }
                if e.kind() == io::ErrorKind::ConnectionRefused && refused < 1 {
                    refused += 1;
                    continue;
                }
                return (sent, Some(e));
            }
            if n == 0 {
                break;
            }
            sent += n as usize;
        }
        (sent, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    #[test]
    fn batches_round_trip_unchanged() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = SockAddr::from(rx.local_addr().unwrap());
        let payloads: Vec<Vec<u8>> = (0..10u8)
            .map(|i| vec![i; 1 + i as usize * 700])
            .chain([vec![0xAB; 65_507]])
            .collect();
        let mut out = SendBatch::with_capacity(4);
        for p in &payloads {
            out.push(p);
        }
        let (sent, err) = out.send_to(tx.as_raw_fd(), &to);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(sent, payloads.len());
        out.clear();
        assert!(out.is_empty());

        // Connected: no address per datagram.
        let conn = UdpSocket::bind("127.0.0.1:0").unwrap();
        conn.connect(rx.local_addr().unwrap()).unwrap();
        out.push(b"connected");
        assert_eq!(out.send(conn.as_raw_fd()).0, 1);
        out.clear();

        let mut batch = RecvBatch::new(4);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < payloads.len() + 1 && Instant::now() < deadline {
            let n = batch.recv(rx.as_raw_fd()).unwrap();
            assert!(n <= 4);
            got.extend((0..n).map(|i| batch.get(i).to_vec()));
            if n == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut want = payloads.clone();
        want.push(b"connected".to_vec());
        assert_eq!(got, want);
        assert_eq!(batch.recv(rx.as_raw_fd()).unwrap(), 0, "nothing left");
    }
}
