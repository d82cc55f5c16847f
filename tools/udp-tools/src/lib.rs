//! Shared pieces of the udp-tools binaries (`udp-gen`, `udp-sink`, `bare-forward`,
//! `drop-loop`): loopback-only addresses, the test TxID layout, core pinning, CPU time,
//! a stop flag set by SIGTERM/SIGINT, and batched `recvmmsg`/`sendmmsg` buffers.
//!
//! Everything here is for loopback load tests on one machine: an address that is not
//! loopback is refused as a usage error.

use std::fmt;
use std::io;
use std::mem;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Largest UDP payload over IPv4.
pub const DATAGRAM_BYTES_MAX: usize = 65_507;
/// Largest `--batch` any tool accepts (mmsghdr arrays are sized at start-up).
pub const BATCH_MAX: usize = 1024;
/// Largest `--max-seconds` any tool accepts: every loop stops by itself.
pub const RUN_SECONDS_MAX: u64 = 3600;
/// Receive timeout, so blocking loops look at the stop flag and their deadlines.
pub const RECV_POLL_MS: u64 = 100;
/// Bytes of a test TxID that hold the index (big-endian u64, the TxID's last 8 bytes).
pub const TXID_INDEX_BYTES: usize = 8;
/// A test TxID is at least 4 bytes of run tag plus the index.
pub const TXID_LEN_MIN: usize = TXID_INDEX_BYTES + 4;
/// Longest test TxID.
pub const TXID_LEN_MAX: usize = 256;

/// What went wrong: a usage error (exit 2) or a failure while running (exit 1).
#[derive(Debug)]
pub enum Error {
    /// A flag value that cannot be used (bad address, non-loopback, out of range).
    Usage(String),
    /// A syscall that failed, and what it was doing.
    Io { what: String, source: io::Error },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) => write!(f, "{m}"),
            Error::Io { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// Prints the error as `tool: message` on stderr and exits 2 (usage) or 1 (runtime).
    pub fn exit(&self, tool: &str) -> ! {
        eprintln!("{tool}: {self}");
        std::process::exit(match self {
            Error::Usage(_) => 2,
            Error::Io { .. } => 1,
        })
    }
}

/// Parses one `HOST:PORT` and refuses anything that is not loopback.
/// `flag`'s value must lie in `range`; a usage error naming it otherwise.
pub fn check_range(
    flag: &str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<(), Error> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "{flag} {value}: must be {}..={}",
            range.start(),
            range.end()
        )))
    }
}

/// The flags both baselines (bare-forward, drop-loop) take: the same
/// receive side, so the pair measures only what differs.
#[derive(clap::Args, Debug)]
pub struct BaselineArgs {
    /// Address to receive on (loopback only).
    #[arg(long)]
    pub listen: String,
    /// Pin to this CPU.
    #[arg(long)]
    pub core: Option<usize>,
    /// Datagrams per recvmmsg (and sendmmsg).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Stop after this long in any case.
    #[arg(long, default_value_t = 300)]
    pub max_seconds: u64,
    /// Stop after this much silence once something arrived (0 = never).
    #[arg(long, default_value_t = 0)]
    pub idle_ms: u64,
    /// SO_RCVBUF bytes, capped by net.core.rmem_max as txgate's are (0 = kernel default);
    /// the default is txgate's own (4 MiB per shard socket).
    #[arg(long, default_value_t = 4 << 20)]
    pub rcvbuf: usize,
}

/// The checks and set-up every tool starts with: batch and run-time bounds,
/// pinning, and the stop handler.
pub fn start_run(batch: usize, max_seconds: u64, core: Option<usize>) -> Result<(), Error> {
    check_range("--batch", batch as u64, 1..=BATCH_MAX as u64)?;
    check_range("--max-seconds", max_seconds, 1..=RUN_SECONDS_MAX)?;
    if let Some(core) = core {
        pin_to_core(core)?;
    }
    install_stop_handler()
}

pub fn loopback_addr(flag: &str, s: &str) -> Result<SocketAddr, Error> {
    let s = s.trim();
    let addrs: Vec<SocketAddr> = match s.parse::<SocketAddr>() {
        Ok(a) => vec![a],
        Err(_) => s
            .to_socket_addrs()
            .map_err(|e| Error::Usage(format!("{flag} {s:?}: not HOST:PORT ({e})")))?
            .collect(),
    };
    let Some(first) = addrs.first().copied() else {
        return Err(Error::Usage(format!(
            "{flag} {s:?}: resolves to no address"
        )));
    };
    if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(Error::Usage(format!(
            "{flag} {s:?}: {bad} is not a loopback address; these tools only send to and \
             listen on 127.0.0.0/8 or ::1"
        )));
    }
    Ok(first)
}

/// Parses `ADDR[,ADDR…]`, each loopback.
pub fn loopback_addrs(flag: &str, s: &str) -> Result<Vec<SocketAddr>, Error> {
    let addrs = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| loopback_addr(flag, p))
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(Error::Usage(format!("{flag}: no address given")));
    }
    Ok(addrs)
}

/// Checks `--txid-offset`/`--txid-len` against the test TxID layout and the datagram size.
pub fn check_txid_layout(offset: usize, len: usize, size: Option<usize>) -> Result<(), Error> {
    if !(TXID_LEN_MIN..=TXID_LEN_MAX).contains(&len) {
        return Err(Error::Usage(format!(
            "--txid-len {len}: must be {TXID_LEN_MIN}..={TXID_LEN_MAX} (run tag of at least 4 \
             bytes, then an 8-byte big-endian index)"
        )));
    }
    if let Some(size) = size
        && offset + len > size
    {
        return Err(Error::Usage(format!(
            "--txid-offset {offset} + --txid-len {len} does not fit in --size {size}"
        )));
    }
    Ok(())
}

/// The run tag bytes of a test TxID: `len - 8` bytes expanded from a 64-bit tag.
pub fn tag_bytes(tag: u64, txid_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(txid_len - TXID_INDEX_BYTES);
    let mut state = tag;
    while out.len() < txid_len - TXID_INDEX_BYTES {
        let word = splitmix64(&mut state);
        out.extend_from_slice(&word.to_be_bytes());
    }
    out.truncate(txid_len - TXID_INDEX_BYTES);
    out
}

/// Writes TxID `index` of the run whose tag bytes are `tag` at `txid` (the TxID's bytes).
#[inline]
pub fn write_index(txid: &mut [u8], index: u64) {
    let at = txid.len() - TXID_INDEX_BYTES;
    txid[at..].copy_from_slice(&index.to_be_bytes());
}

/// Splits a test TxID into (tag bytes, index).
#[inline]
pub fn split_txid(txid: &[u8]) -> (&[u8], u64) {
    let at = txid.len() - TXID_INDEX_BYTES;
    let mut idx = [0u8; TXID_INDEX_BYTES];
    idx.copy_from_slice(&txid[at..]);
    (&txid[..at], u64::from_be_bytes(idx))
}

/// splitmix64: a small, good-enough generator for tags and filler.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Parses a 64-bit tag written as up to 16 hex digits.
pub fn parse_tag(s: &str) -> Result<u64, Error> {
    let t = s.trim_start_matches("0x");
    if t.is_empty() || t.len() > 16 {
        return Err(Error::Usage(format!("--tag {s:?}: 1 to 16 hex digits")));
    }
    u64::from_str_radix(t, 16).map_err(|_| Error::Usage(format!("--tag {s:?}: not hex")))
}

/// Pins the calling thread to one CPU.
pub fn pin_to_core(core: usize) -> Result<(), Error> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if core >= 1024 {
        return Err(Error::Usage(format!("--core {core}: out of range")));
    }
    // SAFETY: cpu_set_t is plain data (all-zero is the empty set); CPU_SET is given an
    // index below CPU_SETSIZE (1024, checked above); sched_setaffinity reads the set only.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(Error::Usage(format!(
            "--core {core}: cannot pin there ({e}); this process may use {cpus} CPU(s)"
        )));
    }
    Ok(())
}

/// User and system CPU seconds of this process so far (`getrusage(RUSAGE_SELF)`).
pub fn cpu_seconds() -> (f64, f64) {
    // SAFETY: rusage is plain data; getrusage writes it and cannot fail for RUSAGE_SELF
    // with a valid pointer.
    let ru = unsafe {
        let mut ru: libc::rusage = mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(ru.ru_utime), secs(ru.ru_stime))
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Makes SIGTERM and SIGINT set the stop flag. No SA_RESTART: a blocking
/// `recvmmsg`/`sendmmsg` returns EINTR, and the loop then sees the flag.
pub fn install_stop_handler() -> Result<(), Error> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe); the sigaction
        // struct is fully initialised (zeroed, then handler and empty mask set).
        let rc = unsafe {
            let mut sa: libc::sigaction = mem::zeroed();
            sa.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(sig, &sa, ptr::null_mut())
        };
        if rc != 0 {
            return Err(Error::io("sigaction", io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// True once SIGTERM or SIGINT arrived.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Binds a UDP socket on a loopback address, with a receive timeout of `RECV_POLL_MS`
/// and, when `rcvbuf_bytes` > 0, that receive buffer: plain `SO_RCVBUF` (capped by
/// `net.core.rmem_max`, as txgate sets its own), or with `force` `SO_RCVBUFFORCE` past
/// the cap when root (the sink, which should never be the one dropping).
pub fn bind_receiver(
    addr: SocketAddr,
    rcvbuf_bytes: usize,
    force: bool,
) -> Result<UdpSocket, Error> {
    let sock = UdpSocket::bind(addr).map_err(|e| Error::io(format!("bind {addr}"), e))?;
    sock.set_read_timeout(Some(Duration::from_millis(RECV_POLL_MS)))
        .map_err(|e| Error::io("SO_RCVTIMEO", e))?;
    if rcvbuf_bytes > 0 {
        set_rcvbuf(&sock, rcvbuf_bytes, force)?;
    }
    Ok(sock)
}

fn set_rcvbuf(sock: &UdpSocket, bytes: usize, force: bool) -> Result<(), Error> {
    let val = libc::c_int::try_from(bytes)
        .map_err(|_| Error::Usage(format!("--rcvbuf {bytes}: too large")))?;
    let opts: &[libc::c_int] = if force {
        &[libc::SO_RCVBUFFORCE, libc::SO_RCVBUF]
    } else {
        &[libc::SO_RCVBUF]
    };
    for &opt in opts {
        // SAFETY: a valid socket fd and a pointer to a c_int of the stated length.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&val as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    Err(Error::io("SO_RCVBUF", io::Error::last_os_error()))
}

/// The socket's receive buffer as the kernel reports it (`SO_RCVBUF`, bytes).
pub fn rcvbuf_bytes(sock: &UdpSocket) -> usize {
    let mut val: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket fd; val and len are valid for writes of the stated size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 { val.max(0) as usize } else { 0 }
}

/// Datagrams the kernel dropped at this socket because its receive buffer was full
/// (the `drops` column of /proc/net/udp{,6}, found by the socket's inode).
pub fn socket_drops(sock: &UdpSocket) -> Option<u64> {
    // SAFETY: fstat on a valid fd into a zeroed stat struct.
    let inode = unsafe {
        let mut st: libc::stat = mem::zeroed();
        if libc::fstat(sock.as_raw_fd(), &mut st) != 0 {
            return None;
        }
        st.st_ino
    };
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() >= 13 && cols[9].parse::<u64>().ok() == Some(inode) {
                return cols[12].parse().ok();
            }
        }
    }
    None
}

/// Converts a socket address to the C form `sendmmsg` takes.
pub fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data, large and aligned enough for both the
    // sockaddr_in and sockaddr_in6 written into it below.
    unsafe {
        let mut ss: libc::sockaddr_storage = mem::zeroed();
        match addr {
            SocketAddr::V4(a) => {
                let sin =
                    &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                (ss, mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
            }
            SocketAddr::V6(a) => {
                let sin6 =
                    &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                sin6.sin6_flowinfo = a.flowinfo();
                sin6.sin6_scope_id = a.scope_id();
                (ss, mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
            }
        }
    }
}

/// `batch` receive slots of `slot_bytes` each, with their iovecs and mmsghdrs, allocated
/// once. The vectors' heap buffers never move after `new`, so the pointers stay valid.
pub struct RecvBatch {
    bufs: Vec<u8>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    slot_bytes: usize,
}

impl RecvBatch {
    pub fn new(batch: usize, slot_bytes: usize) -> Self {
        assert!((1..=BATCH_MAX).contains(&batch) && slot_bytes > 0);
        let mut bufs = vec![0u8; batch * slot_bytes];
        let mut iovs: Vec<libc::iovec> = (0..batch)
            .map(|i| libc::iovec {
                // SAFETY: i * slot_bytes < bufs.len(): in bounds of one allocation.
                iov_base: unsafe { bufs.as_mut_ptr().add(i * slot_bytes) }.cast(),
                iov_len: slot_bytes,
            })
            .collect();
        let hdrs = (0..batch)
            .map(|i| {
                // SAFETY: mmsghdr is plain data; all-zero means no name, no control data.
                let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
                // SAFETY: i < iovs.len().
                h.msg_hdr.msg_iov = unsafe { iovs.as_mut_ptr().add(i) };
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        RecvBatch {
            bufs,
            iovs,
            hdrs,
            slot_bytes,
        }
    }

    /// One `recvmmsg` (MSG_WAITFORONE: waits for the first datagram, up to the socket's
    /// receive timeout, then takes what is queued). Ok(0) on timeout or signal.
    pub fn recv(&mut self, sock: &UdpSocket) -> Result<usize, Error> {
        self.recv_flags(sock, libc::MSG_WAITFORONE)
    }

    /// One `recvmmsg` that never waits: what is queued now, Ok(0) when nothing is.
    pub fn try_recv(&mut self, sock: &UdpSocket) -> Result<usize, Error> {
        self.recv_flags(sock, libc::MSG_DONTWAIT)
    }

    fn recv_flags(&mut self, sock: &UdpSocket, flags: libc::c_int) -> Result<usize, Error> {
        // SAFETY: hdrs holds hdrs.len() initialised headers whose iovecs point into bufs,
        // all alive for the call; a null timeout is allowed.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as libc::c_uint,
                flags,
                ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(Error::io("recvmmsg", e)),
            };
        }
        Ok(n as usize)
    }

    /// The payload of datagram `i` of the last `recv` (cut at the slot size).
    pub fn packet(&self, i: usize) -> &[u8] {
        let len = (self.hdrs[i].msg_len as usize).min(self.slot_bytes);
        &self.bufs[i * self.slot_bytes..i * self.slot_bytes + len]
    }

    /// Whether datagram `i` was longer than its slot.
    pub fn truncated(&self, i: usize) -> bool {
        self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0
    }

    /// The iovec of slot `i` (what a forwarder re-sends).
    pub fn iov(&self, i: usize) -> libc::iovec {
        libc::iovec {
            iov_base: self.iovs[i].iov_base,
            iov_len: self.packet(i).len(),
        }
    }
}

/// How a receive loop ended and what it saw.
pub struct LoopEnd {
    /// "signal", "max-seconds" or "idle".
    pub stopped: &'static str,
    pub received: u64,
    /// When the first and the last datagram arrived.
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

impl LoopEnd {
    /// Counts a batch of `n` datagrams received now.
    fn took(&mut self, n: usize) {
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.received += n as u64;
    }

    /// Seconds from the first to the last datagram.
    pub fn active_s(&self) -> f64 {
        match (self.first, self.last) {
            (Some(f), Some(l)) => (l - f).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// Most batches [`receive_loop`] takes from the queue once it has decided to stop.
const FINAL_DRAIN_BATCHES: usize = 4096;

/// Receives batches until SIGTERM/SIGINT, `max_s`, or `idle_ms` of silence after the
/// first datagram (0 = no idle stop), handing each non-empty batch to `on_batch`.
/// Before it stops it takes what is already queued (a datagram that came between the
/// last wait's timeout and the decision is counted, not left unread); on an idle stop,
/// anything found that way means the sender was not idle, and it carries on.
pub fn receive_loop(
    sock: &UdpSocket,
    rx: &mut RecvBatch,
    max_s: u64,
    idle_ms: u64,
    mut on_batch: impl FnMut(&RecvBatch, usize) -> Result<(), Error>,
) -> Result<LoopEnd, Error> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(max_s);
    let idle = Duration::from_millis(idle_ms);
    let mut end = LoopEnd {
        stopped: "signal",
        received: 0,
        first: None,
        last: None,
    };
    loop {
        if stop_requested() {
            end.stopped = "signal";
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            end.stopped = "max-seconds";
            break;
        }
        if let (true, Some(last)) = (idle_ms > 0, end.last)
            && now - last >= idle
        {
            if drain_queued(sock, rx, &mut end, &mut on_batch)? > 0 {
                continue;
            }
            end.stopped = "idle";
            return Ok(end);
        }
        let n = rx.recv(sock)?;
        if n == 0 {
            continue;
        }
        end.took(n);
        on_batch(rx, n)?;
    }
    drain_queued(sock, rx, &mut end, &mut on_batch)?;
    Ok(end)
}

/// Takes what is queued on `sock` without waiting (at most [`FINAL_DRAIN_BATCHES`]
/// batches), counting it into `end`; returns how many datagrams it took.
fn drain_queued(
    sock: &UdpSocket,
    rx: &mut RecvBatch,
    end: &mut LoopEnd,
    on_batch: &mut impl FnMut(&RecvBatch, usize) -> Result<(), Error>,
) -> Result<u64, Error> {
    let mut took = 0;
    for _ in 0..FINAL_DRAIN_BATCHES {
        let n = rx.try_recv(sock)?;
        if n == 0 {
            break;
        }
        end.took(n);
        took += n as u64;
        on_batch(rx, n)?;
    }
    Ok(took)
}

/// Result of sending a batch: how many went out and how many failed (each failed one is
/// skipped, counted, not retried).
#[derive(Default, Clone, Copy)]
pub struct SendOutcome {
    pub sent: usize,
    pub errors: usize,
}

/// Sends `hdrs` with `sendmmsg`, resuming after partial sends; a message the kernel
/// refuses (ECONNREFUSED, ENOBUFS, …) is skipped and counted. EINTR retries the same
/// message at most `EINTR_RETRIES_MAX` times in a row.
pub fn send_all(fd: libc::c_int, hdrs: &mut [libc::mmsghdr]) -> Result<SendOutcome, Error> {
    const EINTR_RETRIES_MAX: u32 = 16;
    let mut out = SendOutcome::default();
    let mut at = 0;
    let mut eintr = 0;
    while at < hdrs.len() {
        // SAFETY: hdrs[at..] are initialised headers whose names and iovecs the caller
        // keeps alive for the call.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr().add(at),
                (hdrs.len() - at) as libc::c_uint,
                0,
            )
        };
        if n > 0 {
            out.sent += n as usize;
            at += n as usize;
            eintr = 0;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) if eintr < EINTR_RETRIES_MAX => eintr += 1,
            Some(
                libc::EINTR
                | libc::ECONNREFUSED
                | libc::ENOBUFS
                | libc::EAGAIN
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH,
            ) => {
                out.errors += 1;
                at += 1;
                eintr = 0;
            }
            _ => return Err(Error::io("sendmmsg", e)),
        }
    }
    Ok(out)
}

/// A tiny JSON object writer for the one-line summaries (numbers, strings, bools).
#[derive(Default)]
pub struct JsonLine {
    out: String,
}

impl JsonLine {
    fn key(&mut self, k: &str) {
        self.out.push(if self.out.is_empty() { '{' } else { ',' });
        self.out.push('"');
        self.out.push_str(k);
        self.out.push_str("\":");
    }
    pub fn u(mut self, k: &str, v: u64) -> Self {
        self.key(k);
        self.out.push_str(&v.to_string());
        self
    }
    pub fn f(mut self, k: &str, v: f64) -> Self {
        self.key(k);
        if v.is_finite() {
            self.out.push_str(&format!("{v:.6}"));
        } else {
            self.out.push_str("null");
        }
        self
    }
    pub fn s(mut self, k: &str, v: &str) -> Self {
        self.key(k);
        self.out.push('"');
        for c in v.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                c if (c as u32) < 0x20 => self.out.push_str(&format!("\\u{:04x}", c as u32)),
                c => self.out.push(c),
            }
        }
        self.out.push('"');
        self
    }
    /// A receiver's common fields: where the run stopped, kernel drops,
    /// buffer size, batch, and the CPU it used between `cpu0` and `cpu1`.
    pub fn receiver(
        self,
        end: &LoopEnd,
        sock: &UdpSocket,
        batch: usize,
        cpu0: (f64, f64),
        cpu1: (f64, f64),
    ) -> Self {
        self.f("seconds", end.active_s())
            .s("stopped", end.stopped)
            .opt_u("rcvbuf_drops", socket_drops(sock))
            .u("rcvbuf_bytes", rcvbuf_bytes(sock) as u64)
            .u("batch", batch as u64)
            .f("cpu_user_s", cpu1.0 - cpu0.0)
            .f("cpu_sys_s", cpu1.1 - cpu0.1)
    }

    pub fn b(mut self, k: &str, v: bool) -> Self {
        self.key(k);
        self.out.push_str(if v { "true" } else { "false" });
        self
    }
    pub fn opt_u(self, k: &str, v: Option<u64>) -> Self {
        match v {
            Some(v) => self.u(k, v),
            None => {
                let mut s = self;
                s.key(k);
                s.out.push_str("null");
                s
            }
        }
    }
    /// The finished line, without a newline.
    pub fn finish(mut self) -> String {
        if self.out.is_empty() {
            self.out.push('{');
        }
        self.out.push('}');
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_addresses_are_refused() {
        assert!(loopback_addr("--to", "127.0.0.1:9").is_ok());
        assert!(loopback_addr("--to", "127.3.2.1:9").is_ok());
        assert!(loopback_addr("--to", "[::1]:9").is_ok());
        assert!(matches!(
            loopback_addr("--to", "10.0.0.1:9"),
            Err(Error::Usage(_))
        ));
        assert!(matches!(
            loopback_addr("--to", "0.0.0.0:9"),
            Err(Error::Usage(_))
        ));
        assert!(matches!(
            loopback_addrs("--to", "127.0.0.1:9,192.168.1.1:9"),
            Err(Error::Usage(_))
        ));
    }

    #[test]
    fn txid_round_trips_tag_and_index() {
        let tag = tag_bytes(0xabc, 16);
        let mut txid = [0u8; 16];
        txid[..8].copy_from_slice(&tag);
        write_index(&mut txid, 123_456_789);
        let (t, i) = split_txid(&txid);
        assert_eq!(t, &tag[..]);
        assert_eq!(i, 123_456_789);
        assert_ne!(tag_bytes(0xabc, 16), tag_bytes(0xabd, 16));
        assert_eq!(tag_bytes(1, 40).len(), 32);
    }

    #[test]
    fn a_datagram_queued_when_the_idle_stop_is_decided_is_counted() {
        let sock = bind_receiver("127.0.0.1:0".parse().unwrap(), 0, false).unwrap();
        let to = sock.local_addr().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"first", to).unwrap();
        let mut rx = RecvBatch::new(4, 64);
        let mut batches = 0;
        // Handling the first batch outlasts the idle time, and a second datagram is
        // queued meanwhile: the loop sees idle before it reads again.
        let end = receive_loop(&sock, &mut rx, 10, 30, |_, _| {
            batches += 1;
            if batches == 1 {
                tx.send_to(b"second", to).unwrap();
                std::thread::sleep(Duration::from_millis(60));
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(end.stopped, "idle");
        assert_eq!(end.received, 2, "the queued datagram is counted");
    }

    #[test]
    fn json_line_is_one_object() {
        let l = JsonLine::default()
            .u("a", 1)
            .f("b", 0.5)
            .s("c", "x\"y")
            .b("d", true)
            .opt_u("e", None)
            .finish();
        assert_eq!(l, r#"{"a":1,"b":0.500000,"c":"x\"y","d":true,"e":null}"#);
    }
}
