//! Batched datagram I/O: `recvmmsg` into fixed slots, `sendmmsg` of borrowed
//! payloads, runs of equal-size payloads as UDP GSO messages. One syscall
//! moves a whole batch, which is what keeps the gate's CPU per packet near a
//! bare forwarder's.

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
        self.read(fd, libc::MSG_DONTWAIT)
    }

    /// Sleeps in the kernel until a datagram is queued, then reads up to a
    /// batch: one syscall where waiting in `poll(2)` and reading takes two.
    /// Needs a socket in blocking mode ([`blocking_with_timeout`]); `Ok(0)`
    /// when its receive timeout passed first (or a signal came).
    pub fn recv_waiting(&mut self, fd: RawFd) -> io::Result<usize> {
        self.read(fd, libc::MSG_WAITFORONE)
    }

    fn read(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
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
                flags,
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

/// Puts `sock` in blocking mode with a receive timeout, so a blocking read
/// ([`RecvBatch::recv_waiting`]) returns after `timeout` at most (the kernel
/// rounds it up to its tick: 4 ms at HZ=250). Every other read of the socket
/// must pass `MSG_DONTWAIT` ([`RecvBatch::recv`] and glommio's reads do;
/// io_uring never blocks on it).
pub fn blocking_with_timeout(
    sock: &socket2::Socket,
    timeout: std::time::Duration,
) -> io::Result<()> {
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(timeout))
}

/// Asks for an `SO_RCVBUF` of `bytes` (0: leave the kernel default) and
/// returns what the kernel granted, in the request's terms: it caps a
/// request at `net.core.rmem_max` without an error, and reports twice what
/// it granted (it counts its bookkeeping in the buffer).
pub fn set_receive_buffer(sock: &socket2::Socket, bytes: usize) -> io::Result<usize> {
    if bytes > 0 {
        sock.set_recv_buffer_size(bytes)?;
    }
    Ok(sock.recv_buffer_size()? / 2)
}

/// `SO_MEMINFO` from `asm-generic/socket.h` (x86, arm, riscv, mips alike;
/// the `libc` crate does not export it for Linux).
const SO_MEMINFO: libc::c_int = 55;

/// Datagrams the kernel dropped on `fd`'s socket (a full receive buffer,
/// mostly): `SK_MEMINFO_DROPS` of `SO_MEMINFO`, a 32-bit count that wraps.
/// One syscall: for the cold path, not per packet.
pub fn receive_drops(fd: RawFd) -> io::Result<u32> {
    const DROPS: usize = libc::SK_MEMINFO_DROPS as usize;
    let mut mem = [0u32; DROPS + 1];
    let mut len = std::mem::size_of_val(&mem) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `mem`, which holds
    // that many, and stores how many it wrote in `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_MEMINFO,
            mem.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < std::mem::size_of_val(&mem) {
        return Err(io::Error::other(format!(
            "SO_MEMINFO returned {len} bytes, without the drop count"
        )));
    }
    Ok(mem[DROPS])
}

/// Longest run of equal-size payloads sent as one UDP GSO message: the
/// kernel's `UDP_MAX_SEGMENTS` (64 before Linux 6.x raised it).
const GSO_SEGMENTS_MAX: usize = 64;
/// Most payload bytes in one GSO message (one IP datagram's worth, less
/// headers, with room to spare for IPv6's).
const GSO_BYTES_MAX: usize = 65_000;
/// Largest payload sent by GSO: each segment must fit the path MTU, and
/// 1452 fits IPv6 over a 1500-byte link. Larger payloads go one per message.
const GSO_SEGMENT_MAX: usize = 1452;
/// Room for one `UDP_SEGMENT` control message (CMSG_SPACE of a u16).
type SegmentCmsg = [u64; 3];

/// How a target takes a batch: UDP GSO for runs of equal-size payloads, or
/// one message per payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendMode {
    /// Runs of equal-size payloads (up to 64) go as one message that the
    /// kernel segments: the stack is walked once per run, and a receiver on
    /// the same core is woken once per run instead of once per datagram.
    Gso,
    /// One message per payload (a target that refused GSO, or multicast).
    Plain,
}

/// A batch of outgoing payloads, sent to each target with one `sendmmsg`.
/// Payloads are borrowed by pointer: fill, send, clear, all before the
/// buffers they point into change.
pub struct SendBatch {
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// Payloads each header carries (more than one: a GSO run).
    counts: Vec<usize>,
    cmsgs: Vec<SegmentCmsg>,
}

impl SendBatch {
    /// Room for `cap` payloads (more grow the vectors).
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            iovs: Vec::with_capacity(cap),
            hdrs: Vec::with_capacity(cap),
            counts: Vec::with_capacity(cap),
            cmsgs: Vec::with_capacity(cap),
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
        self.counts.clear();
    }

    /// Sends every queued payload through `fd`, a socket connected to its
    /// target (blocking with a send timeout, so a full send buffer is waited
    /// out, boundedly). Returns how many were sent and the last error. An
    /// error of one message (too large, refused by a firewall rule) skips
    /// that message only: the rest were claimed and must still go. A send
    /// buffer still full after its timeout stops the batch.
    /// A target that refuses GSO gets the rest one message per payload, and
    /// `mode` turns [`SendMode::Plain`] so later batches skip the attempt.
    pub fn send(&mut self, fd: RawFd, mode: &mut SendMode) -> (usize, Option<io::Error>) {
        if *mode == SendMode::Gso {
            let out = self.send_from(fd, None, 0, true);
            if let Some(for_good) = out.gso_failed {
                // From the run that failed on: each of its datagrams alone
                // (one may be what the kernel refused; the others still go).
                // A route that cannot take GSO at all stays plain; a passing
                // failure (ENOBUFS) costs this batch only.
                if for_good {
                    *mode = SendMode::Plain;
                }
                let more = self.send_from(fd, None, out.next, false);
                return (out.sent + more.sent, more.err.or(out.err));
            }
            (out.sent, out.err)
        } else {
            let out = self.send_from(fd, None, 0, false);
            (out.sent, out.err)
        }
    }

    /// [`SendBatch::send`] on an unconnected socket, to `to`, one message
    /// per payload.
    pub fn send_to(&mut self, fd: RawFd, to: &SockAddr) -> (usize, Option<io::Error>) {
        let out = self.send_from(fd, Some(to), 0, false);
        (out.sent, out.err)
    }

    /// Lays out one header per payload, or per run of equal-size payloads
    /// with `gso`, from payload `from` on.
    fn build(&mut self, to: Option<&SockAddr>, from: usize, gso: bool) {
        self.hdrs.clear();
        self.counts.clear();
        let n = self.iovs.len();
        // Sized before any pointer into it is taken: it must not move. Only
        // GSO runs (k > 1 below) use a slot.
        self.cmsgs.clear();
        if gso {
            self.cmsgs.resize(n.saturating_sub(from), [0; 3]);
        }
        let mut i = from;
        while i < n {
            let size = self.iovs[i].iov_len;
            let mut k = 1;
            if gso && size > 0 && size <= GSO_SEGMENT_MAX {
                let cap = GSO_SEGMENTS_MAX.min(GSO_BYTES_MAX / size);
                while i + k < n && k < cap && self.iovs[i + k].iov_len == size {
                    k += 1;
                }
            }
            // SAFETY: an all-zero msghdr is valid; the fields set below point
            // at `to`, at iovecs `i..i + k` and at this header's cmsg slot,
            // all alive and unmoved until the send returns.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            if let Some(to) = to {
                h.msg_hdr.msg_name = to.as_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_namelen = to.len();
            }
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = k;
            if k > 1 {
                let slot = &mut self.cmsgs[self.hdrs.len()];
                h.msg_hdr.msg_control = slot.as_mut_ptr() as *mut libc::c_void;
                // SAFETY: CMSG_* only compute sizes and offsets within `slot`,
                // which holds CMSG_SPACE(2) bytes (checked by a test).
                unsafe {
                    h.msg_hdr.msg_controllen = libc::CMSG_SPACE(2) as usize;
                    let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, size as u16);
                }
            }
            self.hdrs.push(h);
            self.counts.push(k);
            i += k;
        }
    }

    /// Sends payloads `from..`; returns how many of them went.
    fn send_from(&mut self, fd: RawFd, to: Option<&SockAddr>, from: usize, gso: bool) -> Sent {
        self.build(to, from, gso);
        let mut done = 0;
        let mut sent = 0;
        // The first payload of header `done`.
        let mut next = from;
        let mut eintr = 0;
        // A connected socket reports an earlier ICMP port-unreachable on
        // the next send, which then sends nothing: retry that, boundedly.
        let mut refused = 0;
        let mut last_err = None;
        while done < self.hdrs.len() {
            // SAFETY: headers `done..` were laid out by `build` and point at
            // live iovecs, cmsg slots and `to`.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs.as_mut_ptr().add(done),
                    (self.hdrs.len() - done) as libc::c_uint,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted && eintr < 8 {
                    eintr += 1;
                    continue;
                }
                if e.kind() == io::ErrorKind::ConnectionRefused && refused < 4 {
                    refused += 1;
                    continue;
                }
                // The whole target's: a send buffer that stayed full (each
                // retry would wait the timeout again), a refusal that keeps
                // coming.
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::ConnectionRefused
                ) {
                    return Sent {
                        sent,
                        next,
                        err: Some(e),
                        gso_failed: None,
                    };
                }
                // A GSO message the kernel refused (no GSO on this route, a
                // segment over its MTU: EMSGSIZE): the caller sends the run
                // and the rest one datagram each.
                if gso && (self.counts[done] > 1 || gso_refused(&e)) {
                    // Not an error of any datagram: how they are sent changes.
                    tracing::debug!("GSO refused: {e}");
                    let for_good = gso_refused(&e) || e.raw_os_error() == Some(libc::EMSGSIZE);
                    return Sent {
                        sent,
                        next,
                        err: last_err,
                        gso_failed: Some(for_good),
                    };
                }
                // This datagram's own (after a partial send, the next call
                // reports the error of the first message it did not send):
                // skip it, send the rest.
                next += self.counts[done];
                done += 1;
                last_err = Some(e);
                continue;
            }
            if n == 0 {
                break;
            }
            let went = self.counts[done..done + n as usize].iter().sum::<usize>();
            sent += went;
            next += went;
            done += n as usize;
        }
        Sent {
            sent,
            next,
            err: last_err,
            gso_failed: None,
        }
    }
}

/// How [`SendBatch::send_from`] ended.
struct Sent {
    /// Payloads that went.
    sent: usize,
    /// The first payload not yet sent or skipped.
    next: usize,
    /// The last error.
    err: Option<io::Error>,
    /// A GSO message was refused: send from `next` one datagram each;
    /// `true` when the route cannot take GSO at all.
    gso_failed: Option<bool>,
}

/// Errors with which a target says it cannot take GSO at all (no
/// `UDP_SEGMENT`, no checksum offload on its route, a segment over its
/// MTU): its datagrams then go one message each.
fn gso_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
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
        let mut mode = SendMode::Gso;
        assert_eq!(out.send(conn.as_raw_fd(), &mut mode).0, 1);
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

    fn receive_all(rx: &UdpSocket, want: usize) -> Vec<Vec<u8>> {
        let mut batch = RecvBatch::new(16);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < want && Instant::now() < deadline {
            let n = batch.recv(rx.as_raw_fd()).unwrap();
            got.extend((0..n).map(|i| batch.get(i).to_vec()));
            if n == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        got
    }

    /// Runs of 64-byte, 700-byte and 10-byte payloads around ones too big
    /// for GSO, each payload numbered so order and boundaries show.
    fn mixed_payloads() -> Vec<Vec<u8>> {
        let numbered = |i: usize, len: usize| {
            let mut p = vec![(i % 251) as u8; len];
            p[..2].copy_from_slice(&(i as u16).to_be_bytes());
            p
        };
        let lens = std::iter::repeat_n(64, 100)
            .chain(std::iter::repeat_n(700, 3))
            .chain([65_507, 2_000, 2_000])
            .chain(std::iter::repeat_n(10, 70))
            .chain([64]);
        lens.enumerate().map(|(i, len)| numbered(i, len)).collect()
    }

    fn set_socket_int(sock: &UdpSocket, name: libc::c_int, value: libc::c_int) {
        // SAFETY: an int option on a socket we own.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    }

    /// Sends `payloads` as one batch starting in GSO mode; the mode after.
    fn send_batch(tx: &UdpSocket, payloads: &[Vec<u8>]) -> SendMode {
        let mut out = SendBatch::with_capacity(8);
        for p in payloads {
            out.push(p);
        }
        let mut mode = SendMode::Gso;
        let (sent, err) = out.send(tx.as_raw_fd(), &mut mode);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(sent, payloads.len());
        mode
    }

    fn connected_pair() -> (UdpSocket, UdpSocket) {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        set_socket_int(&rx, libc::SO_RCVBUF, 8 << 20);
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        (tx, rx)
    }

    #[test]
    fn gso_groups_runs_of_equal_size_and_nothing_else() {
        assert!(std::mem::size_of::<SegmentCmsg>() >= unsafe { libc::CMSG_SPACE(2) } as usize);
        let payloads = mixed_payloads();
        let mut out = SendBatch::with_capacity(8);
        for p in &payloads {
            out.push(p);
        }
        out.build(None, 0, true);
        // 100 × 64 B: 64 + 36; 3 × 700 B: one run; too big for GSO: one
        // each; 70 × 10 B: 64 + 6; the last 64 B alone.
        assert_eq!(out.counts, [64, 36, 3, 1, 1, 1, 64, 6, 1]);
        out.build(None, 10, true);
        assert_eq!(out.counts, [64, 26, 3, 1, 1, 1, 64, 6, 1]);
        out.build(None, 0, false);
        assert_eq!(out.counts, vec![1; payloads.len()]);
    }

    #[test]
    fn gso_batches_arrive_as_the_same_datagrams_in_order() {
        let (tx, rx) = connected_pair();
        let payloads = mixed_payloads();
        assert_eq!(
            send_batch(&tx, &payloads),
            SendMode::Gso,
            "loopback takes GSO"
        );
        let got = receive_all(&rx, payloads.len());
        assert_eq!(
            got, payloads,
            "one datagram per payload, unchanged, in order"
        );
    }

    #[test]
    fn a_datagram_the_kernel_refuses_costs_only_itself() {
        let (tx, rx) = connected_pair();
        // Over IPv4's largest UDP payload (65 507 bytes): EMSGSIZE. A gate
        // listening on [::] can receive one that size.
        let payloads = vec![
            vec![1u8; 100],
            vec![2u8; 65_508],
            vec![3u8; 100],
            vec![4u8; 100],
        ];
        for mut mode in [SendMode::Plain, SendMode::Gso] {
            let mut out = SendBatch::with_capacity(8);
            for p in &payloads {
                out.push(p);
            }
            let (sent, err) = out.send(tx.as_raw_fd(), &mut mode);
            assert_eq!(sent, 3, "{mode:?}");
            assert_eq!(
                err.and_then(|e| e.raw_os_error()),
                Some(libc::EMSGSIZE),
                "{mode:?}"
            );
            let mut want = payloads.clone();
            want.remove(1);
            assert_eq!(receive_all(&rx, 3), want, "{mode:?}");
        }
    }

    #[test]
    fn a_skipped_datagram_before_a_refused_gso_run_sends_nothing_twice() {
        let (tx, rx) = connected_pair();
        // The kernel refuses GSO on a socket that skips UDP checksums.
        set_socket_int(&tx, libc::SO_NO_CHECK, 1);
        let payloads = vec![
            vec![1u8; 65_508],
            vec![2u8; 100],
            vec![3u8; 200],
            vec![4u8; 200],
            vec![5u8; 200],
        ];
        let mut out = SendBatch::with_capacity(8);
        for p in &payloads {
            out.push(p);
        }
        let mut mode = SendMode::Gso;
        let (sent, err) = out.send(tx.as_raw_fd(), &mut mode);
        assert_eq!(mode, SendMode::Plain);
        assert_eq!(sent, 4);
        assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::EMSGSIZE));
        assert_eq!(receive_all(&rx, 4), payloads[1..].to_vec());
        // Nothing more is on its way (a resent datagram would be).
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        assert!(rx.recv(&mut [0u8; 1024]).is_err(), "a datagram came twice");
    }

    #[test]
    fn a_socket_that_refuses_gso_gets_every_datagram_one_by_one() {
        let (tx, rx) = connected_pair();
        // The kernel refuses GSO on a socket that skips UDP checksums.
        set_socket_int(&tx, libc::SO_NO_CHECK, 1);
        let payloads = mixed_payloads();
        assert_eq!(
            send_batch(&tx, &payloads),
            SendMode::Plain,
            "the refusal is remembered"
        );
        assert_eq!(receive_all(&rx, payloads.len()), payloads);
    }

    #[test]
    fn a_full_receive_buffer_shows_in_the_socket_drop_count() {
        let rx = socket2::Socket::from(UdpSocket::bind("127.0.0.1:0").unwrap());
        let granted = set_receive_buffer(&rx, 4096).unwrap();
        assert!(granted >= 4096, "{granted}");
        assert_eq!(receive_drops(rx.as_raw_fd()).unwrap(), 0);
        let to = rx.local_addr().unwrap().as_socket().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Each datagram costs far more than 4 KiB / 200 of buffer.
        for _ in 0..200 {
            tx.send_to(&[7u8; 100], to).unwrap();
        }
        let drops = receive_drops(rx.as_raw_fd()).unwrap();
        let mut batch = RecvBatch::new(64);
        let mut queued = 0;
        for _ in 0..10 {
            queued += batch.recv(rx.as_raw_fd()).unwrap() as u32;
        }
        assert!(drops > 0, "nothing dropped ({queued} queued)");
        assert_eq!(drops + queued, 200);
    }

    #[test]
    fn a_blocking_read_sleeps_until_a_datagram_or_its_timeout_and_the_plain_read_never_blocks() {
        let rx = socket2::Socket::from(UdpSocket::bind("127.0.0.1:0").unwrap());
        let to = rx.local_addr().unwrap().as_socket().unwrap();
        let fd = rx.as_raw_fd();
        let mut batch = RecvBatch::new(8);

        // The plain read stays non-blocking on a blocking socket: with a 5 s
        // receive timeout, a read that blocked would take 5 s.
        blocking_with_timeout(&rx, Duration::from_secs(5)).unwrap();
        let t = Instant::now();
        assert_eq!(batch.recv(fd).unwrap(), 0);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

        // Nothing comes: the blocking read returns empty after its timeout.
        blocking_with_timeout(&rx, Duration::from_millis(100)).unwrap();
        let t = Instant::now();
        assert_eq!(batch.recv_waiting(fd).unwrap(), 0);
        assert!(
            t.elapsed() >= Duration::from_millis(90),
            "{:?}",
            t.elapsed()
        );

        // Datagrams sent while it sleeps: it wakes and takes what is queued.
        blocking_with_timeout(&rx, Duration::from_secs(5)).unwrap();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            tx.send_to(b"first", to).unwrap();
        });
        let t = Instant::now();
        let n = batch.recv_waiting(fd).unwrap();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        sender.join().unwrap();
        assert_eq!(n, 1);
        assert_eq!(batch.get(0), b"first");
    }
}
