//! The protocol-independent pipelined connection, written once and driven by
//! the Redis (and later Aerospike) codecs.
//!
//! Every task of a shard encodes its request straight into one write buffer
//! and takes a place in the in-flight FIFO; one driver task per connection
//! writes the buffer out in batches and reads replies, handing each to the
//! FIFO's head. The rules that keep it correct:
//!
//! - **Bounded**: at most `inflight_max` requests in flight (timed-out
//!   placeholders included); past it a call fails at once (`Overflow`).
//! - **Timeouts never desync**: [`Pipeline::sweep`], run by one per-shard task,
//!   fails every request past its deadline, but the request keeps its place;
//!   its late reply is read and dropped. Callers that give up (drop the
//!   future) leave a placeholder the same way.
//! - **Loss fails everything at once**: a read or write error, EOF, a reply
//!   nobody asked for, or bytes the codec refuses drop the connection and
//!   fail every in-flight request; the driver reconnects with jittered
//!   exponential backoff while new calls fail fast (`Disconnected`).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncWrite};

/// A wire protocol's reply parser: bytes in, one reply and its length out.
pub trait Protocol: 'static {
    type Reply: 'static;
    type Error: std::fmt::Display;
    /// Parses the reply at the front of `buf`; `Ok(None)` when incomplete.
    fn decode(buf: &[u8]) -> Result<Option<(Self::Reply, usize)>, Self::Error>;
}

/// Opens a ready connection: dial (with the dial timeout, on a resolved
/// address) and the protocol's handshake, which completes before the
/// connection takes work.
pub trait Connector: 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + 'static;
    fn connect(&self) -> impl Future<Output = Result<Self::Stream, String>>;
    /// Who it dials, for the log lines of an outage.
    fn peer(&self) -> String {
        String::new()
    }
}

/// While reconnects keep failing, a warning at most this often (the first
/// failure always warns): an operator sees an outage that fails claims
/// open without a line per attempt.
const RECONNECT_WARN_EVERY: Duration = Duration::from_secs(60);

/// Bounds of one pipelined connection.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Requests in flight at most (placeholders of timed-out ones included).
    pub inflight_max: usize,
    /// Deadline of every request, from submission.
    pub op_timeout: Duration,
    /// First reconnect delay; doubles per failed attempt up to the max.
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    /// Largest reply the read buffer grows to hold.
    pub reply_bytes_max: usize,
    /// A reply this long past its deadline marks the connection dead: it is
    /// dropped (failing what is in flight) and redialed.
    pub dead_after: Duration,
    /// Replies handed out per driver pass: a quarter of those in flight,
    /// within these bounds. The driver then yields so their tasks queue the
    /// next requests, which go out while the rest of the replies wait:
    /// client and server work at the same time instead of taking turns.
    pub reply_chunk_min: usize,
    pub reply_chunk_max: usize,
    /// After a pass that handed out replies with at least
    /// [`GATHER_MIN_INFLIGHT`] requests still in flight, the next read waits
    /// up to this long (zero: read as soon as bytes arrive). A server that
    /// answers pipelined requests one by one, as they complete (Aerospike),
    /// would otherwise cost a sleep and a wake-up of the shard per reply; a
    /// pause lets several replies gather. The pause adapts within this bound
    /// (see [`GatherPace`]). Writes are not held back.
    pub reply_gather: Duration,
}

/// The pause before the next read, steered by what the last one gathered:
/// most of the replies in flight (the server ran dry, or nearly, while the
/// client waited) shortens it by a quarter; under half lengthens it by a
/// quarter, up to the configured bound. It settles where a pause gathers
/// half to three quarters of what is in flight, whatever the server's speed
/// and however late the runtime's timers fire.
#[derive(Debug, Clone, PartialEq)]
pub struct GatherPace {
    now: Duration,
    max: Duration,
    armed_with: usize,
}

impl GatherPace {
    const FLOOR: Duration = Duration::from_micros(1);

    /// Starts at a quarter of `max`.
    pub fn new(max: Duration) -> Self {
        Self {
            now: (max / 4).max(Self::FLOOR).min(max),
            max,
            armed_with: 0,
        }
    }

    /// The pause to take now, with `inflight` requests outstanding.
    pub fn arm(&mut self, inflight: usize) -> Duration {
        self.armed_with = inflight;
        self.now
    }

    /// `got` replies came with the first read after the pause.
    pub fn judge(&mut self, got: usize) {
        let n = self.armed_with;
        if got * 4 >= n * 3 {
            self.now = (self.now * 3 / 4).max(Self::FLOOR);
        } else if got * 2 < n {
            self.now = (self.now * 5 / 4 + Self::FLOOR).min(self.max);
        }
    }

    /// The pause the next arm takes.
    pub fn current(&self) -> Duration {
        self.now
    }
}

/// Written bytes at the front of the write buffer past which the driver
/// moves the unwritten rest down (when it is at most as long), so a socket
/// that never quite drains cannot grow the buffer without bound.
const WBUF_COMPACT_BYTES: usize = 64 << 10;

/// Requests that must remain in flight for a pause before the next read
/// (see [`PipelineConfig::reply_gather`]): with fewer, each wait would save
/// little and delay every one of them.
pub const GATHER_MIN_INFLIGHT: usize = 4;

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            inflight_max: 4096,
            op_timeout: Duration::from_millis(50),
            reconnect_backoff_min: Duration::from_millis(10),
            reconnect_backoff_max: Duration::from_secs(1),
            reply_bytes_max: (512 << 20) + 4096,
            dead_after: Duration::from_secs(1),
            reply_chunk_min: 4,
            reply_chunk_max: 64,
            reply_gather: Duration::ZERO,
        }
    }
}

/// Why a call got no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("too many requests in flight ({0})")]
    Overflow(usize),
    #[error("not connected")]
    Disconnected,
    #[error("connection lost with the request in flight")]
    Lost,
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("connection closed")]
    Closed,
}

impl CallError {
    /// The request may have reached the server (a retry could see its effect).
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, Self::Lost | Self::Timeout(_))
    }
}

/// Counters of one connection; `Copy` for snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineCounters {
    pub calls: u64,
    pub replies: u64,
    pub timeouts: u64,
    /// Replies that arrived after their caller timed out or gave up.
    pub late_replies: u64,
    pub overflows: u64,
    pub disconnects: u64,
    pub connects: u64,
    /// Write syscalls that carried requests (batching shows as calls / flushes).
    pub flushes: u64,
    /// Reads that returned bytes (replies / reads: replies per wake-up).
    pub reads: u64,
}

impl PipelineCounters {
    /// Adds `o` into `self` (totals over connections).
    pub fn add(&mut self, o: &PipelineCounters) {
        self.calls += o.calls;
        self.replies += o.replies;
        self.timeouts += o.timeouts;
        self.late_replies += o.late_replies;
        self.overflows += o.overflows;
        self.disconnects += o.disconnects;
        self.connects += o.connects;
        self.flushes += o.flushes;
        self.reads += o.reads;
    }
}

const NO_SLOT: u32 = u32::MAX;

struct Entry {
    slot: u32,
    deadline: Instant,
}

enum Slot<R> {
    Free,
    Waiting(Option<Waker>),
    Done(Result<R, CallError>),
    /// The caller dropped its future; the entry waits for its reply.
    Abandoned,
}

struct State<R> {
    up: bool,
    /// Set by the sweep when the oldest request is `dead_after` overdue.
    dead: bool,
    closed: bool,
    wbuf: Vec<u8>,
    fifo: VecDeque<Entry>,
    /// Leading FIFO entries already failed by the sweep.
    swept: usize,
    /// Some entry's deadline is earlier than one before it (a resend or
    /// retry sharing its op's deadline): the sweep then looks past the
    /// first entry not yet due.
    unordered: bool,
    /// The latest deadline queued, what a new call's is compared with (the
    /// last entry may be an early one already failed).
    latest: Option<Instant>,
    slots: Vec<Slot<R>>,
    free: Vec<u32>,
    driver: Option<Waker>,
    counters: PipelineCounters,
}

impl<R> State<R> {
    fn complete(&mut self, slot: u32, result: Result<R, CallError>) {
        if slot == NO_SLOT {
            return;
        }
        let s = &mut self.slots[slot as usize];
        match std::mem::replace(s, Slot::Free) {
            Slot::Waiting(w) => {
                *s = Slot::Done(result);
                if let Some(w) = w {
                    w.wake();
                }
            }
            Slot::Abandoned => self.free.push(slot),
            other => *s = other,
        }
    }

    fn fail_all(&mut self, err: CallError) {
        while let Some(e) = self.fifo.pop_front() {
            self.complete(e.slot, Err(err.clone()));
        }
        self.swept = 0;
        self.unordered = false;
        self.latest = None;
        self.wbuf.clear();
    }
}

/// A pipelined connection shared by the tasks of one shard.
pub struct Pipeline<P: Protocol> {
    state: Rc<RefCell<State<P::Reply>>>,
    config: PipelineConfig,
    driver_task: RefCell<Option<glommio::Task<()>>>,
    closed: Rc<Cell<bool>>,
}

impl<P: Protocol> Pipeline<P> {
    /// Connects once (so start-up fails closed), then hands the connection
    /// to a driver task that also reconnects after a loss.
    pub async fn connect<C: Connector>(
        connector: C,
        config: PipelineConfig,
    ) -> Result<Self, String> {
        let stream = connector.connect().await?;
        Ok(Self::start(connector, Some(stream), config))
    }

    /// A connection that dials in the background, with the same jittered
    /// backoff as a reconnect, while calls fail fast (`Disconnected`): for a
    /// peer found while running, which must not hold the caller, nor leave
    /// a gap if it does not answer yet.
    pub fn connect_later<C: Connector>(connector: C, config: PipelineConfig) -> Self {
        Self::start(connector, None, config)
    }

    fn start<C: Connector>(connector: C, first: Option<C::Stream>, config: PipelineConfig) -> Self {
        let state = Rc::new(RefCell::new(State {
            up: first.is_some(),
            dead: false,
            closed: false,
            wbuf: Vec::with_capacity(64 << 10),
            fifo: VecDeque::with_capacity(config.inflight_max),
            swept: 0,
            unordered: false,
            latest: None,
            slots: Vec::with_capacity(config.inflight_max),
            free: Vec::new(),
            driver: None,
            counters: PipelineCounters {
                connects: u64::from(first.is_some()),
                ..Default::default()
            },
        }));
        let closed = Rc::new(Cell::new(false));
        let task = glommio::spawn_local(drive::<P, C>(
            state.clone(),
            connector,
            first,
            config.clone(),
            closed.clone(),
        ));
        Self {
            state,
            config,
            driver_task: RefCell::new(Some(task)),
            closed,
        }
    }

    /// Sends one request, encoded by `encode` into the shared write buffer,
    /// and waits for its reply or the op timeout.
    pub async fn call(&self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<P::Reply, CallError> {
        self.call_by(Instant::now() + self.config.op_timeout, encode)
            .await
    }

    /// [`Pipeline::call`] with the deadline given: an op made of several
    /// calls (a redirect followed, a retry) keeps one deadline for them all.
    pub async fn call_by(
        &self,
        deadline: Instant,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<P::Reply, CallError> {
        let slot = {
            let mut st = self.state.borrow_mut();
            if st.closed {
                return Err(CallError::Closed);
            }
            if !st.up {
                return Err(CallError::Disconnected);
            }
            if st.fifo.len() >= self.config.inflight_max {
                st.counters.overflows += 1;
                return Err(CallError::Overflow(self.config.inflight_max));
            }
            encode(&mut st.wbuf);
            let slot = match st.free.pop() {
                Some(s) => {
                    st.slots[s as usize] = Slot::Waiting(None);
                    s
                }
                None => {
                    st.slots.push(Slot::Waiting(None));
                    (st.slots.len() - 1) as u32
                }
            };
            if st.latest.is_some_and(|l| l > deadline) {
                st.unordered = true;
            }
            st.latest = st.latest.max(Some(deadline));
            st.fifo.push_back(Entry { slot, deadline });
            st.counters.calls += 1;
            if let Some(w) = &st.driver {
                w.wake_by_ref();
            }
            slot
        };
        Wait {
            state: &self.state,
            slot,
            done: false,
        }
        .await
    }

    /// Fails every request whose deadline has passed, leaving its place in
    /// the FIFO so its late reply is read and dropped. Bounded by the FIFO.
    pub fn sweep(&self, now: Instant) {
        let mut st = self.state.borrow_mut();
        let timeout = self.config.op_timeout;
        while st.swept < st.fifo.len() {
            let i = st.swept;
            if st.fifo[i].deadline > now {
                break;
            }
            let slot = std::mem::replace(&mut st.fifo[i].slot, NO_SLOT);
            if slot != NO_SLOT {
                st.counters.timeouts += 1;
                st.complete(slot, Err(CallError::Timeout(timeout)));
            }
            st.swept += 1;
        }
        if st.unordered {
            // Rare and brief (an op's deadline at most): a full pass fails
            // what is due behind entries that are not, leaving their places.
            let (mut latest, mut still) = (None::<Instant>, false);
            for i in st.swept..st.fifo.len() {
                let (slot, deadline) = (st.fifo[i].slot, st.fifo[i].deadline);
                if slot == NO_SLOT {
                    continue;
                }
                if deadline <= now {
                    st.fifo[i].slot = NO_SLOT;
                    st.counters.timeouts += 1;
                    st.complete(slot, Err(CallError::Timeout(timeout)));
                } else {
                    still |= latest.is_some_and(|l| deadline < l);
                    latest = latest.max(Some(deadline));
                }
            }
            st.unordered = still;
        }
        // A reply this overdue means a wedged peer or a half-open connection
        // (no RST ever comes): replace the connection rather than fail every
        // new call with Overflow once placeholders fill the FIFO.
        if st.up
            && st
                .fifo
                .front()
                .is_some_and(|e| e.deadline + self.config.dead_after <= now)
        {
            st.dead = true;
            if let Some(w) = &st.driver {
                w.wake_by_ref();
            }
        }
    }

    /// Whether the connection is up now.
    pub fn is_up(&self) -> bool {
        self.state.borrow().up
    }

    /// Requests in flight, placeholders included.
    pub fn inflight(&self) -> usize {
        self.state.borrow().fifo.len()
    }

    /// Counters so far.
    pub fn counters(&self) -> PipelineCounters {
        self.state.borrow().counters
    }

    /// Fails everything in flight and stops the driver; later calls fail
    /// with `Closed`.
    pub fn close(&self) {
        self.closed.set(true);
        {
            let mut st = self.state.borrow_mut();
            st.closed = true;
            st.up = false;
            st.fail_all(CallError::Closed);
        }
        // Dropping the task handle cancels the driver (and its socket).
        self.driver_task.borrow_mut().take();
    }
}

impl<P: Protocol> Drop for Pipeline<P> {
    fn drop(&mut self) {
        self.close();
    }
}

struct Wait<'a, R> {
    state: &'a Rc<RefCell<State<R>>>,
    slot: u32,
    done: bool,
}

impl<R> Future for Wait<'_, R> {
    type Output = Result<R, CallError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.state.borrow_mut();
        let i = self.slot as usize;
        match std::mem::replace(&mut st.slots[i], Slot::Free) {
            Slot::Done(r) => {
                st.free.push(self.slot);
                drop(st);
                self.done = true;
                Poll::Ready(r)
            }
            Slot::Waiting(_) => {
                st.slots[i] = Slot::Waiting(Some(cx.waker().clone()));
                Poll::Pending
            }
            other => {
                st.slots[i] = other;
                drop(st);
                self.done = true;
                Poll::Ready(Err(CallError::Closed))
            }
        }
    }
}

impl<R> Drop for Wait<'_, R> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.state.borrow_mut();
        let i = self.slot as usize;
        match st.slots[i] {
            // Its reply (or the sweep) will free it.
            Slot::Waiting(_) => st.slots[i] = Slot::Abandoned,
            Slot::Done(_) => {
                st.slots[i] = Slot::Free;
                st.free.push(self.slot);
            }
            _ => {}
        }
    }
}

/// The driver: runs the connection until it fails, then reconnects with
/// jittered exponential backoff, until closed.
async fn drive<P: Protocol, C: Connector>(
    state: Rc<RefCell<State<P::Reply>>>,
    connector: C,
    first: Option<C::Stream>,
    config: PipelineConfig,
    closed: Rc<Cell<bool>>,
) {
    let mut stream = first;
    let mut backoff = config.reconnect_backoff_min;
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut seed = since_epoch.as_nanos() as u64 ^ (Rc::as_ptr(&state) as u64);
    let mut failed_dials = 0u64;
    let mut warned_at: Option<Instant> = None;
    loop {
        if closed.get() {
            return;
        }
        if let Some(s) = stream.take() {
            backoff = config.reconnect_backoff_min;
            if failed_dials > 0 {
                tracing::warn!(peer = %connector.peer(), "reconnected after {failed_dials} failed dials");
            }
            failed_dials = 0;
            state.borrow_mut().up = true;
            let err = run::<P, C::Stream>(&state, s, &config).await;
            if !closed.get() {
                tracing::warn!(peer = %connector.peer(), error = %err, "connection lost; reconnecting");
            }
            let mut st = state.borrow_mut();
            st.up = false;
            st.driver = None;
            st.counters.disconnects += 1;
            st.fail_all(CallError::Lost);
        }
        if closed.get() {
            return;
        }
        // Jitter in [backoff/2, backoff): instances don't reconnect in step.
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let half = backoff / 2;
        let jitter = half.mul_f64((seed >> 11) as f64 / (1u64 << 53) as f64);
        glommio::timer::sleep(half + jitter).await;
        backoff = (backoff * 2).min(config.reconnect_backoff_max);
        match connector.connect().await {
            Ok(s) => {
                state.borrow_mut().counters.connects += 1;
                stream = Some(s);
            }
            Err(e) => {
                failed_dials += 1;
                if warned_at.is_none_or(|at| at.elapsed() >= RECONNECT_WARN_EVERY) {
                    warned_at = Some(Instant::now());
                    tracing::warn!(
                        peer = %connector.peer(),
                        error = %e,
                        "reconnect failed ({failed_dials} in a row); calls fail until one succeeds"
                    );
                }
            }
        }
    }
}

/// Moves bytes until the connection fails; returns why.
async fn run<P: Protocol, S: AsyncRead + AsyncWrite + Unpin>(
    state: &Rc<RefCell<State<P::Reply>>>,
    mut stream: S,
    config: &PipelineConfig,
) -> io::Error {
    let mut rbuf = vec![0u8; 64 << 10];
    let (mut start, mut filled) = (0usize, 0usize);
    let mut written = 0usize;
    // Set after a write: streams that buffer (TLS) need a flush to put
    // their records on the wire; plain TCP's flush is a no-op.
    let mut unflushed = false;
    // Armed after a pass that handed out replies (see
    // `PipelineConfig::reply_gather`); no read until it fires.
    let mut gather: Option<glommio::timer::Timer> = None;
    let mut pace = GatherPace::new(config.reply_gather);
    // Set when a pause ends: the next pass that hands replies out judges it.
    let mut judge = false;
    poll_fn(|cx| {
        let mut st = state.borrow_mut();
        if st.closed {
            return Poll::Ready(io::Error::other("closed"));
        }
        if std::mem::take(&mut st.dead) {
            return Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "no reply long past the op timeout: replacing the connection",
            ));
        }
        st.driver = Some(cx.waker().clone());
        // Bounded: each pass moves bytes or returns; a pass that moves
        // nothing returns Pending.
        loop {
            let mut progress = false;
            if written < st.wbuf.len() {
                match Pin::new(&mut stream).poll_write(cx, &st.wbuf[written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => {
                        written += n;
                        st.counters.flushes += 1;
                        unflushed = true;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(e),
                    Poll::Pending => {}
                }
                if written == st.wbuf.len() {
                    st.wbuf.clear();
                    written = 0;
                } else if written >= WBUF_COMPACT_BYTES && written * 2 >= st.wbuf.len() {
                    // Requests keep arriving while the socket lags: without
                    // this, the written prefix would grow for as long as the
                    // buffer never empties.
                    st.wbuf.drain(..written);
                    written = 0;
                }
            }
            if unflushed {
                match Pin::new(&mut stream).poll_flush(cx) {
                    Poll::Ready(Ok(())) => unflushed = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(e),
                    Poll::Pending => {}
                }
            }
            // Hand complete replies to the FIFO's head, a chunk per pass (see
            // `PipelineConfig::reply_chunk_min`), then yield.
            let chunk = (st.fifo.len() / 4).clamp(config.reply_chunk_min, config.reply_chunk_max);
            let mut handed = 0;
            while handed < chunk {
                match P::decode(&rbuf[start..filled]) {
                    Ok(Some((reply, used))) => {
                        start += used;
                        let Some(e) = st.fifo.pop_front() else {
                            return Poll::Ready(io::Error::other(
                                "reply without a request: protocol desync",
                            ));
                        };
                        if st.swept > 0 {
                            st.swept -= 1;
                        }
                        if e.slot == NO_SLOT || matches!(st.slots[e.slot as usize], Slot::Abandoned)
                        {
                            st.counters.late_replies += 1;
                        }
                        st.counters.replies += 1;
                        st.complete(e.slot, Ok(reply));
                        handed += 1;
                    }
                    Ok(None) => break,
                    Err(err) => {
                        return Poll::Ready(io::Error::new(
                            io::ErrorKind::InvalidData,
                            err.to_string(),
                        ));
                    }
                }
            }
            if start == filled {
                start = 0;
                filled = 0;
            }
            if handed > 0 && std::mem::take(&mut judge) {
                pace.judge(handed);
            }
            if handed > 0
                && gather.is_none()
                && !config.reply_gather.is_zero()
                && st.fifo.len() >= GATHER_MIN_INFLIGHT
            {
                let pause = pace.arm(st.fifo.len());
                gather = Some(glommio::timer::Timer::new(pause));
            }
            if handed == chunk {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if filled == rbuf.len() {
                if start > 0 {
                    rbuf.copy_within(start..filled, 0);
                    filled -= start;
                    start = 0;
                } else if rbuf.len() < config.reply_bytes_max {
                    let grown = (rbuf.len() * 2).min(config.reply_bytes_max);
                    rbuf.resize(grown, 0);
                } else {
                    return Poll::Ready(io::Error::other("reply larger than the read bound"));
                }
            }
            if let Some(t) = gather.as_mut() {
                if Pin::new(t).poll(cx).is_pending() {
                    if !progress {
                        return Poll::Pending;
                    }
                    continue;
                }
                gather = None;
                judge = true;
            }
            match Pin::new(&mut stream).poll_read(cx, &mut rbuf[filled..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(io::ErrorKind::UnexpectedEof.into()),
                Poll::Ready(Ok(n)) => {
                    filled += n;
                    st.counters.reads += 1;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(e),
                Poll::Pending => {}
            }
            if !progress {
                return Poll::Pending;
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{SocketAddr, TcpListener};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A line protocol: every reply is one `\n`-terminated line.
    struct Lines;
    impl Protocol for Lines {
        type Reply = String;
        type Error = String;
        fn decode(buf: &[u8]) -> Result<Option<(String, usize)>, String> {
            match buf.iter().position(|&b| b == b'\n') {
                Some(i) if buf[..i].starts_with(b"BAD") => Err("refused".into()),
                Some(i) => Ok(Some((
                    String::from_utf8_lossy(&buf[..i]).into_owned(),
                    i + 1,
                ))),
                None => Ok(None),
            }
        }
    }

    /// Echoes each line after an optional `sleep:<ms>:` delay; `close` drops
    /// the connection; `extra` answers twice (a reply nobody asked for).
    fn server() -> (SocketAddr, Arc<AtomicUsize>) {
        server_at("127.0.0.1:0".parse().unwrap())
    }

    /// [`server`] on a given address.
    fn server_at(at: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind(at).unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().take(16) {
                let Ok(conn) = conn else { return };
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut w = conn.try_clone().unwrap();
                    for line in BufReader::new(conn).lines().take(100_000) {
                        let Ok(line) = line else { return };
                        if let Some(rest) = line.strip_prefix("sleep:") {
                            let (ms, _) = rest.split_once(':').unwrap();
                            std::thread::sleep(Duration::from_millis(ms.parse().unwrap()));
                        }
                        if line == "close" {
                            return;
                        }
                        let reply = if line == "extra" {
                            "extra\nextra\n".to_string()
                        } else {
                            format!("{line}\n")
                        };
                        if w.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    struct Dial(SocketAddr);
    impl Connector for Dial {
        type Stream = glommio::net::TcpStream;
        async fn connect(&self) -> Result<Self::Stream, String> {
            glommio::net::TcpStream::connect_timeout(self.0, Duration::from_secs(1))
                .await
                .map_err(|e| e.to_string())
        }
    }

    fn config(op_timeout_ms: u64, inflight_max: usize) -> PipelineConfig {
        PipelineConfig {
            inflight_max,
            op_timeout: Duration::from_millis(op_timeout_ms),
            reconnect_backoff_min: Duration::from_millis(20),
            reconnect_backoff_max: Duration::from_millis(100),
            ..Default::default()
        }
    }

    fn line(s: &str) -> impl FnOnce(&mut Vec<u8>) + '_ {
        move |b: &mut Vec<u8>| {
            b.extend_from_slice(s.as_bytes());
            b.push(b'\n');
        }
    }

    /// Sweeps every millisecond, like a shard's sweep task.
    fn sweeper(p: &Rc<Pipeline<Lines>>) -> glommio::Task<()> {
        let weak = Rc::downgrade(p);
        glommio::spawn_local(async move {
            while let Some(p) = weak.upgrade() {
                p.sweep(Instant::now());
                drop(p);
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        })
    }

    #[test]
    fn a_connection_dialed_later_fails_fast_until_its_peer_listens() {
        // A free port, nothing listening on it yet.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        crate::engine::run_local(async move {
            let p = Pipeline::<Lines>::connect_later(Dial(addr), config(2000, 16));
            assert!(!p.is_up());
            assert_eq!(p.call(line("early")).await, Err(CallError::Disconnected));
            glommio::timer::sleep(Duration::from_millis(50)).await;
            assert_eq!(p.counters().connects, 0, "refused dials are not connects");
            server_at(addr);
            let mut answered = None;
            for _ in 0..500 {
                match p.call(line("later")).await {
                    Ok(r) => {
                        answered = Some(r);
                        break;
                    }
                    Err(CallError::Disconnected) => {
                        glommio::timer::sleep(Duration::from_millis(10)).await
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(answered.as_deref(), Some("later"));
            assert_eq!(p.counters().connects, 1);
        });
    }

    #[test]
    fn concurrent_calls_get_their_own_replies_in_batched_writes() {
        let (addr, _) = server();
        crate::engine::run_local(async move {
            let p = Rc::new(
                Pipeline::<Lines>::connect(Dial(addr), config(2000, 4096))
                    .await
                    .unwrap(),
            );
            let tasks: Vec<_> = (0..2000)
                .map(|i| {
                    let p = p.clone();
                    glommio::spawn_local(async move {
                        let want = format!("req-{i}");
                        assert_eq!(p.call(line(&want)).await.unwrap(), want);
                    })
                })
                .collect();
            for t in tasks {
                t.await;
            }
            let c = p.counters();
            assert_eq!((c.calls, c.replies), (2000, 2000));
            assert!(
                c.flushes < 2000,
                "writes were batched: {} flushes",
                c.flushes
            );
        });
    }

    #[test]
    fn replies_answered_one_by_one_are_gathered_into_few_reads() {
        let (addr, _) = server();
        crate::engine::run_local(async move {
            let mut cfg = config(5000, 64);
            cfg.reply_gather = Duration::from_millis(5);
            let p = Rc::new(Pipeline::<Lines>::connect(Dial(addr), cfg).await.unwrap());
            // The server answers each line 1 ms after the previous one: read
            // at once, every reply would take a read of its own.
            let tasks: Vec<_> = (0..64)
                .map(|i| {
                    let p = p.clone();
                    glommio::spawn_local(async move {
                        let want = format!("sleep:1:req-{i}");
                        assert_eq!(p.call(line(&want)).await.unwrap(), want);
                    })
                })
                .collect();
            for t in tasks {
                t.await;
            }
            let c = p.counters();
            assert_eq!(c.replies, 64);
            // Measured: 15-17 reads with the pause, 45-53 without it. The
            // bound leaves room for a loaded host's late timers and sleeps.
            assert!(c.reads <= 30, "{} reads for 64 replies", c.reads);
        });
    }

    #[test]
    fn the_pause_shortens_when_it_drains_and_lengthens_when_it_gathers_little() {
        let max = Duration::from_micros(200);
        let mut p = GatherPace::new(max);
        assert_eq!(p.current(), Duration::from_micros(50));
        // All 16 answered during the pause: the server ran dry, shorten.
        p.arm(16);
        p.judge(16);
        assert_eq!(p.current(), Duration::from_nanos(37_500));
        // Half to three quarters: keep it.
        p.arm(16);
        p.judge(10);
        assert_eq!(p.current(), Duration::from_nanos(37_500));
        // Under half: lengthen, up to the bound and no further.
        for _ in 0..40 {
            p.arm(64);
            p.judge(5);
        }
        assert_eq!(p.current(), max);
        // Never below the floor, however often it drains.
        for _ in 0..200 {
            p.arm(8);
            p.judge(8);
        }
        assert_eq!(p.current(), GatherPace::FLOOR);
        // A bound below the floor is the bound.
        assert_eq!(GatherPace::new(Duration::ZERO).current(), Duration::ZERO);
    }

    #[test]
    fn fewer_than_four_in_flight_are_never_held_back() {
        let (addr, _) = server();
        crate::engine::run_local(async move {
            let mut cfg = config(1000, 64);
            // Far past the op timeout: a held reply would time out.
            cfg.reply_gather = Duration::from_secs(30);
            let p = Rc::new(Pipeline::<Lines>::connect(Dial(addr), cfg).await.unwrap());
            let _sweep = sweeper(&p);
            for round in 0..5 {
                let tasks: Vec<_> = (0..GATHER_MIN_INFLIGHT)
                    .map(|i| {
                        let p = p.clone();
                        glommio::spawn_local(async move {
                            let want = format!("sleep:1:r{round}-{i}");
                            p.call(line(&want)).await.map(|got| assert_eq!(got, want))
                        })
                    })
                    .collect();
                for t in tasks {
                    assert_eq!(t.await, Ok(()));
                }
            }
        });
    }

    #[test]
    fn timed_out_reply_is_dropped_not_delivered() {
        let (addr, _) = server();
        crate::engine::run_local(async move {
            let p = Rc::new(
                Pipeline::<Lines>::connect(Dial(addr), config(50, 64))
                    .await
                    .unwrap(),
            );
            let _sweep = sweeper(&p);
            let slow = p.call(line("sleep:200:slow")).await;
            assert_eq!(slow, Err(CallError::Timeout(Duration::from_millis(50))));
            // Let the late reply arrive (the server answers in order), then the
            // next call must get its own reply, not "slow".
            glommio::timer::sleep(Duration::from_millis(250)).await;
            assert_eq!(p.call(line("next")).await.unwrap(), "next");
            let c = p.counters();
            assert_eq!((c.timeouts, c.late_replies), (1, 1));
        });
    }

    #[test]
    fn a_call_due_before_one_ahead_of_it_times_out_on_time() {
        let (addr, _) = server();
        crate::engine::run_local(async move {
            let p = Rc::new(
                Pipeline::<Lines>::connect(Dial(addr), config(5000, 64))
                    .await
                    .unwrap(),
            );
            let _sweep = sweeper(&p);
            // Ahead: due in 5 s, its reply 2 s away. Behind it: a resend
            // sharing an op's deadline, due in 100 ms. The sweep used to
            // stop at the first entry not due, so the second waited ~2 s.
            let ahead = {
                let p = p.clone();
                glommio::spawn_local(async move {
                    p.call_by(
                        Instant::now() + Duration::from_secs(5),
                        line("sleep:2000:a"),
                    )
                    .await
                })
            };
            glommio::timer::sleep(Duration::from_millis(10)).await;
            let t0 = Instant::now();
            let behind = p
                .call_by(Instant::now() + Duration::from_millis(100), line("b"))
                .await;
            let took = t0.elapsed();
            assert!(matches!(behind, Err(CallError::Timeout(_))), "{behind:?}");
            assert!(took < Duration::from_millis(1000), "{took:?}");
            // Another one after that pass, queued behind the first's
            // placeholder: it too is due before the call still ahead.
            let t0 = Instant::now();
            let third = p
                .call_by(Instant::now() + Duration::from_millis(100), line("c"))
                .await;
            let took = t0.elapsed();
            assert!(matches!(third, Err(CallError::Timeout(_))), "{third:?}");
            assert!(took < Duration::from_millis(1000), "{took:?}");
            assert_eq!(ahead.await.unwrap(), "sleep:2000:a");
        });
    }

    #[test]
    fn a_dropped_call_leaves_a_placeholder() {
        let (addr, _) = server();
        crate::engine::run_local(async move {
            let p = Rc::new(
                Pipeline::<Lines>::connect(Dial(addr), config(2000, 64))
                    .await
                    .unwrap(),
            );
            let gave_up = glommio::timer::timeout(Duration::from_millis(20), async {
                Ok(p.call(line("sleep:100:abandoned")).await)
            })
            .await;
            assert!(gave_up.is_err(), "the caller gave up first");
            assert_eq!(p.call(line("mine")).await.unwrap(), "mine");
            assert_eq!(p.counters().late_replies, 1);
        });
    }

    #[test]
    fn overflow_fails_fast() {
        let (addr, _) = server();
        crate::engine::run_local(async move {
            let p = Rc::new(
                Pipeline::<Lines>::connect(Dial(addr), config(2000, 2))
                    .await
                    .unwrap(),
            );
            let a = glommio::spawn_local({
                let p = p.clone();
                async move { p.call(line("sleep:50:a")).await }
            });
            let b = glommio::spawn_local({
                let p = p.clone();
                async move { p.call(line("b")).await }
            });
            glommio::yield_if_needed().await;
            glommio::executor().yield_task_queue_now().await;
            assert_eq!(p.call(line("c")).await, Err(CallError::Overflow(2)));
            assert_eq!(a.await.unwrap(), "sleep:50:a");
            assert_eq!(b.await.unwrap(), "b");
        });
    }

    #[test]
    fn lost_connection_fails_everything_in_flight_then_reconnects() {
        let (addr, accepted) = server();
        crate::engine::run_local(async move {
            let p = Rc::new(
                Pipeline::<Lines>::connect(Dial(addr), config(2000, 64))
                    .await
                    .unwrap(),
            );
            let waiting: Vec<_> = (0..5)
                .map(|i| {
                    let p = p.clone();
                    glommio::spawn_local(
                        async move { p.call(line(&format!("sleep:30:w{i}"))).await },
                    )
                })
                .collect();
            glommio::executor().yield_task_queue_now().await;
            // The server handles lines in order: `close` comes after the
            // sleeps, so the five replies arrive, then the connection drops.
            let closing = p.call(line("close")).await;
            assert_eq!(closing, Err(CallError::Lost));
            for w in waiting {
                assert!(w.await.is_ok());
            }
            // Fails fast while down, then works again after the backoff.
            let mut ok = false;
            for _ in 0..200 {
                match p.call(line("again")).await {
                    Ok(r) => {
                        assert_eq!(r, "again");
                        ok = true;
                        break;
                    }
                    Err(e) => assert_eq!(e, CallError::Disconnected),
                }
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            assert!(ok, "reconnected");
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
            let c = p.counters();
            assert_eq!((c.disconnects, c.connects), (1, 2));
        });
    }

    #[test]
    fn a_reply_nobody_asked_for_drops_the_connection() {
        let (addr, _) = server();
        crate::engine::run_local(async move {
            let p = Rc::new(
                Pipeline::<Lines>::connect(Dial(addr), config(2000, 64))
                    .await
                    .unwrap(),
            );
            // "extra" is answered twice: the second reply has no request.
            let _ = p.call(line("extra")).await;
            let mut lost = false;
            for _ in 0..100 {
                if !p.is_up() {
                    lost = true;
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            assert!(lost, "desync detected and the connection dropped");
        });
    }

    #[test]
    fn a_connection_whose_replies_stop_is_replaced() {
        let (addr, accepted) = server();
        crate::engine::run_local(async move {
            let mut cfg = config(20, 64);
            cfg.dead_after = Duration::from_millis(100);
            let p = Rc::new(Pipeline::<Lines>::connect(Dial(addr), cfg).await.unwrap());
            let _sweep = sweeper(&p);
            // The server sleeps 2 s before answering: far past dead_after.
            let stuck = p.call(line("sleep:2000:stuck")).await;
            assert_eq!(stuck, Err(CallError::Timeout(Duration::from_millis(20))));
            let mut answered = false;
            for _ in 0..200 {
                if let Ok(r) = p.call(line("fresh")).await {
                    assert_eq!(r, "fresh");
                    answered = true;
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            assert!(answered, "a new connection answers");
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                2,
                "the stuck connection was replaced"
            );
        });
    }

    #[test]
    fn bytes_the_codec_refuses_drop_the_connection() {
        let (addr, _) = server();
        crate::engine::run_local(async move {
            let p = Rc::new(
                Pipeline::<Lines>::connect(Dial(addr), config(2000, 64))
                    .await
                    .unwrap(),
            );
            assert_eq!(p.call(line("BAD")).await, Err(CallError::Lost));
        });
    }
}
