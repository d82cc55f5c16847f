//! A TCP fault proxy on loopback, between a client under test and a server:
//! split replies into 1-byte segments, delay or stall them, reset connections
//! mid-reply. Std threads only; every knob is an atomic that may be flipped
//! while traffic flows.
//!
//! Per accepted client the proxy connects to the upstream and runs two pump
//! threads (client→server, server→client). The knobs act on the
//! server→client direction only; client→server bytes are always forwarded
//! as they come. Every loop polls a stop flag (socket read/write timeouts of
//! 50 ms), so dropping the proxy ends all its threads within a bounded time.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Read/write timeout of every proxied socket: the stop-flag poll interval.
const POLL: Duration = Duration::from_millis(50);
/// Upstream connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default pause between bytes while splitting replies.
pub const DEFAULT_SPLIT_GAP: Duration = Duration::from_micros(50);
/// `reset_budget` value meaning "no reset armed".
const DISARMED: u64 = u64::MAX;

struct Shared {
    stop: AtomicBool,
    split: AtomicBool,
    split_gap_us: AtomicU64,
    delay_us: AtomicU64,
    blackhole: AtomicBool,
    /// Server→client bytes still to forward before a reset; `DISARMED` if
    /// none is armed.
    reset_budget: AtomicU64,
    connections: AtomicUsize,
    resets: AtomicUsize,
    pairs: Mutex<Vec<Weak<Pair>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn pairs(&self) -> MutexGuard<'_, Vec<Weak<Pair>>> {
        self.pairs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live_pairs(&self) -> Vec<Arc<Pair>> {
        self.pairs().iter().filter_map(Weak::upgrade).collect()
    }

    /// Takes up to `n` bytes from an armed reset budget: `None` if no reset
    /// is armed (forward everything), `Some(k)` if the budget ran out here
    /// (forward `k ≤ n` bytes, then reset; the knob disarms).
    fn take_budget(&self, n: usize) -> Option<usize> {
        let n = n as u64;
        let prev = self
            .reset_budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                if b == DISARMED {
                    None
                } else if b <= n {
                    Some(DISARMED)
                } else {
                    Some(b - n)
                }
            });
        match prev {
            Err(_) => None,            // disarmed
            Ok(b) if b > n => None,    // budget left after this chunk
            Ok(b) => Some(b as usize), // runs out within this chunk
        }
    }

    /// Sleeps `d` in slices, giving up early if the pair or proxy stops.
    fn sleep(&self, pair: &Pair, d: Duration) {
        let deadline = Instant::now() + d;
        loop {
            let now = Instant::now();
            if now >= deadline || self.stopped() || pair.is_closed() {
                return;
            }
            thread::sleep((deadline - now).min(Duration::from_millis(5)));
        }
    }
}

/// One proxied connection: the accepted client socket and its upstream.
/// Both sockets close when the last `Arc` (the two pumps') is dropped.
struct Pair {
    client: TcpStream,
    server: TcpStream,
    closed: AtomicBool,
}

impl Pair {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resets both connections: `SO_LINGER` 0 so the final close sends RST,
    /// and `SHUT_RD` (which sends nothing) to wake the pumps so they drop
    /// their handles at once.
    fn reset(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for s in [&self.client, &self.server] {
            set_linger_zero(s);
            let _ = s.shutdown(Shutdown::Read);
        }
    }

    /// Closes both connections gracefully (FIN).
    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for s in [&self.client, &self.server] {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized `linger`.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// A fault-injecting TCP proxy listening on `127.0.0.1:0`.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts proxying to `upstream`; all knobs off.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy: bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("proxy: nonblocking");
        let addr = listener.local_addr().expect("proxy: local_addr");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            split: AtomicBool::new(false),
            split_gap_us: AtomicU64::new(DEFAULT_SPLIT_GAP.as_micros() as u64),
            delay_us: AtomicU64::new(0),
            blackhole: AtomicBool::new(false),
            reset_budget: AtomicU64::new(DISARMED),
            connections: AtomicUsize::new(0),
            resets: AtomicUsize::new(0),
            pairs: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        let accept = {
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("proxy-accept-{}", addr.port()))
                .spawn(move || accept_loop(listener, upstream, shared))
                .expect("proxy: spawn accept thread")
        };
        FaultProxy {
            addr,
            upstream,
            shared,
            accept: Some(accept),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Forward server→client bytes one byte per write (TCP_NODELAY, with
    /// [`set_split_gap`](Self::set_split_gap) between bytes, 50 µs by
    /// default), so the client sees 1-byte segments.
    pub fn set_split_replies(&self, on: bool) {
        self.shared.split.store(on, Ordering::Relaxed);
    }

    /// The pause between bytes while splitting.
    pub fn set_split_gap(&self, gap: Duration) {
        self.shared
            .split_gap_us
            .store(gap.as_micros() as u64, Ordering::Relaxed);
    }

    /// Delay each server→client chunk (as read from the server) by `d`
    /// before forwarding it. `Duration::ZERO` turns it off.
    pub fn set_delay(&self, d: Duration) {
        self.shared
            .delay_us
            .store(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Stop forwarding server→client without closing anything. The bytes are
    /// HELD, not dropped: the proxy stops reading from the server, so the
    /// reply waits in socket buffers and is delivered intact when the
    /// blackhole is turned off. (A chunk already being delayed or split when
    /// it is turned on is still delivered.)
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::Relaxed);
    }

    /// After forwarding `n` more server→client bytes (counted over all
    /// connections), reset the connection pair that carried the last of them:
    /// both its sockets close with `SO_LINGER` 0, so the client sees
    /// ECONNRESET (or EOF) mid-reply. One-shot: the knob disarms when it
    /// fires. `n == 0` resets on the next server→client byte, forwarding none.
    pub fn reset_after_bytes(&self, n: u64) {
        assert!(n < DISARMED, "reset_after_bytes({n}) too large");
        self.shared.reset_budget.store(n, Ordering::Release);
    }

    /// Disarms a pending [`reset_after_bytes`](Self::reset_after_bytes).
    pub fn cancel_reset(&self) {
        self.shared.reset_budget.store(DISARMED, Ordering::Release);
    }

    /// Closes every current connection gracefully (FIN both ways). New
    /// connections are still accepted.
    pub fn close_all(&self) {
        for pair in self.shared.live_pairs() {
            pair.close();
        }
    }

    /// Resets every current connection (RST both ways) now.
    pub fn reset_all(&self) {
        for pair in self.shared.live_pairs() {
            pair.reset();
        }
    }

    /// Client connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Connection pairs currently open.
    pub fn active_connections(&self) -> usize {
        self.shared
            .live_pairs()
            .iter()
            .filter(|p| !p.is_closed())
            .count()
    }

    /// How many times `reset_after_bytes` has fired.
    pub fn resets(&self) -> usize {
        self.shared.resets.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        // Every pump polls the stop flag at least every POLL.
        let threads = std::mem::take(&mut *self.shared.threads());
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    while !shared.stopped() {
        match listener.accept() {
            Ok((client, _)) => {
                shared.connections.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = open_pair(client, upstream, &shared) {
                    eprintln!("fault proxy {upstream}: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(_) => thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn configure(s: &TcpStream) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(POLL))?;
    s.set_write_timeout(Some(POLL))
}

fn open_pair(client: TcpStream, upstream: SocketAddr, shared: &Arc<Shared>) -> io::Result<()> {
    configure(&client)?;
    let server = match TcpStream::connect_timeout(&upstream, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            // Like a refused connection: the client sees a reset.
            set_linger_zero(&client);
            return Err(e);
        }
    };
    configure(&server)?;
    let pair = Arc::new(Pair {
        client,
        server,
        closed: AtomicBool::new(false),
    });
    {
        let mut pairs = shared.pairs();
        pairs.retain(|w| w.strong_count() > 0);
        pairs.push(Arc::downgrade(&pair));
    }
    let mut threads = shared.threads();
    threads.retain(|t| !t.is_finished());
    for upward in [true, false] {
        let (pair, shared) = (pair.clone(), shared.clone());
        threads.push(
            thread::Builder::new()
                .name(format!("proxy-pump-{}", if upward { "up" } else { "down" }))
                .spawn(move || {
                    if upward {
                        pump_up(&pair, &shared);
                    } else {
                        pump_down(&pair, &shared);
                    }
                })?,
        );
    }
    Ok(())
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Writes all of `data`, retrying across write timeouts until done, the pair
/// closes or the proxy stops. False if it could not.
fn write_all(mut to: &TcpStream, mut data: &[u8], pair: &Pair, shared: &Shared) -> bool {
    while !data.is_empty() {
        if shared.stopped() || pair.is_closed() {
            return false;
        }
        match to.write(data) {
            Ok(0) => return false,
            Ok(n) => data = &data[n..],
            Err(e) if timed_out(&e) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Client → server, unchanged.
fn pump_up(pair: &Pair, shared: &Shared) {
    let mut buf = vec![0u8; 64 * 1024];
    while !shared.stopped() && !pair.is_closed() {
        match (&pair.client).read(&mut buf) {
            Ok(0) => {
                if !pair.is_closed() {
                    let _ = pair.server.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => {
                if !write_all(&pair.server, &buf[..n], pair, shared) {
                    pair.reset();
                    return;
                }
            }
            Err(e) if timed_out(&e) => {}
            Err(_) => {
                pair.reset();
                return;
            }
        }
    }
}

/// Server → client, through the knobs.
fn pump_down(pair: &Pair, shared: &Shared) {
    let mut buf = vec![0u8; 64 * 1024];
    while !shared.stopped() && !pair.is_closed() {
        if shared.blackhole.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(2));
            continue;
        }
        let n = match (&pair.server).read(&mut buf) {
            Ok(0) => {
                if !pair.is_closed() {
                    let _ = pair.client.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => n,
            Err(e) if timed_out(&e) => continue,
            Err(_) => {
                pair.reset();
                return;
            }
        };
        let delay = shared.delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            shared.sleep(pair, Duration::from_micros(delay));
        }
        let reset_at = shared.take_budget(n);
        let chunk = &buf[..reset_at.unwrap_or(n)];
        if !forward(chunk, pair, shared) {
            pair.reset();
            return;
        }
        if reset_at.is_some() {
            shared.resets.fetch_add(1, Ordering::Relaxed);
            pair.reset();
            return;
        }
    }
}

fn forward(chunk: &[u8], pair: &Pair, shared: &Shared) -> bool {
    if !shared.split.load(Ordering::Relaxed) {
        return write_all(&pair.client, chunk, pair, shared);
    }
    let gap = Duration::from_micros(shared.split_gap_us.load(Ordering::Relaxed));
    for (i, byte) in chunk.iter().enumerate() {
        if i > 0 && !gap.is_zero() {
            thread::sleep(gap);
        }
        if !write_all(&pair.client, std::slice::from_ref(byte), pair, shared) {
            return false;
        }
    }
    true
}
