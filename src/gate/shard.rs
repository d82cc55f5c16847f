//! One shard's gate loop: read a batch, claim each TxID, forward the
//! winners, repeat; hand packets owned elsewhere to their shard; on stop,
//! claim what the socket still holds (bounded), then drain.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::FutureExt;

use super::udp::{RecvBatch, SendBatch, SendMode};
use super::{ShardEnd, ShardSnapshot};
use crate::engine::Shard;
use crate::metrics::LatencyHistogram;
use crate::route::route;
use crate::txidset::{Claim, Verdict};

/// What every shard runs with.
pub(super) struct ShardPlan {
    pub txid_offset: usize,
    pub txid_len: usize,
    pub batch: usize,
    /// How long after the stop a shard waits for claims in flight (those
    /// it makes from its socket's backlog included).
    pub drain_timeout: Duration,
    /// No datagram can be handed over to this shard (one shard, or kernel
    /// steering): its socket is all it waits on while no claim is pending,
    /// so it may sleep in a blocking read of it (see [`GateShard::receive_waiting`]).
    pub socket_only: bool,
}

/// One shard's sockets and channels, built on the main thread.
pub(super) struct ShardIo {
    pub listen: UdpSocket,
    pub targets: Vec<(UdpSocket, SocketAddr)>,
    pub hop_rx: flume::Receiver<Box<[u8]>>,
    pub hop_txs: Vec<flume::Sender<Box<[u8]>>>,
    pub stop: flume::Receiver<()>,
    pub stats: Arc<Mutex<ShardSnapshot>>,
    /// `listen`'s receive buffer as granted.
    pub receive_buffer_bytes: u64,
}

/// Counters only this shard writes.
#[derive(Default, Clone, Copy)]
struct Counters {
    received: u64,
    forwarded: u64,
    forward_errors: u64,
    short: u64,
    hops_out: u64,
    hops_in: u64,
    recv_errors: u64,
    drain_forwarded: u64,
    /// The kernel's drops on the listen socket, widened past its 32 bits.
    receive_dropped: u64,
    /// Read at the end of the drain, past its bounds: neither claimed nor
    /// forwarded.
    dropped_at_stop: u64,
}

/// A forward target: its connected socket and how it takes a batch.
struct Target {
    sock: UdpSocket,
    to: SocketAddr,
    mode: Cell<SendMode>,
}

impl Target {
    /// GSO for unicast targets until one refuses it; multicast one message
    /// per datagram.
    fn new((sock, to): (UdpSocket, SocketAddr)) -> Self {
        let mode = if to.ip().is_multicast() {
            SendMode::Plain
        } else {
            SendMode::Gso
        };
        Self {
            sock,
            to,
            mode: Cell::new(mode),
        }
    }
}

struct GateShard {
    shard: Rc<Shard>,
    plan: Arc<ShardPlan>,
    shards: u32,
    targets: Vec<Target>,
    /// Emptied when the shard stops reading, so owners' hop loops can end.
    hop_txs: RefCell<Vec<flume::Sender<Box<[u8]>>>>,
    counters: Cell<Counters>,
    claim_latency: RefCell<LatencyHistogram>,
    /// Claims waiting on the store, each a task holding its datagram.
    inflight: Cell<u64>,
    /// Closed when a drain runs out of time: claims still waiting then
    /// forward their datagram (fail-open) instead of being dropped.
    give_up: Rc<glommio::sync::Semaphore>,
    stats: Arc<Mutex<ShardSnapshot>>,
    /// The listen socket, for its drop count (read when publishing).
    listen_fd: RawFd,
    receive_buffer_bytes: u64,
    /// The kernel's 32-bit drop count as last read: it wraps.
    drops_read: Cell<u32>,
}

const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// Longest a busy loop runs before letting the shard poll for I/O. glommio
/// polls completions (store replies, hand-overs, timers) only when its task
/// queue runs dry or its 100 ms preempt timer fires; a loop that always has
/// packets never runs dry, so it steps aside this often.
const REACTOR_EVERY: Duration = Duration::from_micros(100);
/// Longest a shard sleeps in a blocking read of its socket (its receive
/// timeout; the kernel rounds it up to its tick): a slice without a datagram
/// hands the wait back to the reactor.
pub(super) const WAIT_SLICE: Duration = Duration::from_millis(1);
/// How often at least a shard that sleeps in its socket lets its reactor
/// turn while traffic flows. Only timers wait on it then (the figures'
/// publisher every 100 ms, tier-1 upkeep): no claim is pending and nothing
/// can be handed over. Each turn costs a few `io_uring_enter` calls.
const REACTOR_SLICE: Duration = Duration::from_millis(10);

/// How long after the stop a shard goes on claiming what its socket still
/// holds (see [`GateShard::read_backlog`]). The drain gives the claims made
/// then their op timeout on top: `drain_timeout` is the op timeout plus this.
pub(super) const STOP_READ_MAX: Duration = Duration::from_millis(200);
/// Most datagrams a shard claims from its socket after the stop.
const STOP_READ_DATAGRAMS_MAX: u64 = 65_536;
/// How long, and for how many datagrams at most, a shard's last read of
/// its socket goes on counting what it still holds as dropped.
const STOP_COUNT_MAX: Duration = Duration::from_millis(50);
const STOP_COUNT_DATAGRAMS_MAX: u64 = 1 << 20;

/// How long past its drain a shard waits for the others to stop handing
/// datagrams over (each stops when its own read of the backlog ends, at
/// most [`STOP_READ_MAX`] after it saw the stop).
const HANDOVER_WAIT: Duration = STOP_READ_MAX;

/// How long [`step_aside`] sleeps: glommio's next turn finds it due.
const STEP: Duration = Duration::from_micros(1);
/// Bound on [`StepAside`]'s tries at a timer still pending when first polled.
const STEP_TRIES: u32 = 4;

/// Lets the shard's reactor run: a timer that is due almost at once leaves
/// no task runnable, so glommio polls I/O (and fires timers) before resuming
/// us.
fn step_aside() -> StepAside {
    StepAside {
        timer: glommio::timer::Timer::new(STEP),
        tries: 0,
        yielded: false,
    }
}

/// [`step_aside`]'s future. It returns `Pending` to the executor once for
/// sure: a plain `sleep(1 µs)` already due when first polled completes at
/// once without yielding, and after a long busy loop creating the timer
/// can take longer than that (cold caches; up to 6.5 µs measured here), so
/// the reactor — and with it every timer of the shard, the figures'
/// publisher included — never ran during a flood. So the timer's clock is
/// restarted right before each first poll.
struct StepAside {
    timer: glommio::timer::Timer,
    tries: u32,
    yielded: bool,
}

impl Future for StepAside {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = self.get_mut();
        if this.yielded {
            return Pin::new(&mut this.timer).poll(cx).map(|_| ());
        }
        while this.tries < STEP_TRIES {
            this.tries += 1;
            this.timer.reset(STEP);
            if Pin::new(&mut this.timer).poll(cx).is_pending() {
                this.yielded = true;
                return std::task::Poll::Pending;
            }
        }
        std::task::Poll::Ready(())
    }
}

/// Serves until the stop signal, then drains. Runs as a job on its shard.
pub(super) async fn serve(shard: Rc<Shard>, io: ShardIo, plan: Arc<ShardPlan>) -> ShardEnd {
    // SAFETY: the descriptor comes from a socket we own and give up here.
    let listen = unsafe { glommio::net::UdpSocket::from_raw_fd(io.listen.into_raw_fd()) };
    let listen_fd = listen.as_raw_fd();
    let g = Rc::new(GateShard {
        shards: shard.shards() as u32,
        shard,
        plan,
        targets: io.targets.into_iter().map(Target::new).collect(),
        hop_txs: RefCell::new(io.hop_txs),
        counters: Cell::new(Counters::default()),
        claim_latency: RefCell::new(LatencyHistogram::default()),
        inflight: Cell::new(0),
        give_up: Rc::new(glommio::sync::Semaphore::new(0)),
        stats: io.stats,
        listen_fd,
        receive_buffer_bytes: io.receive_buffer_bytes,
        drops_read: Cell::new(0),
    });
    // A second handle on the hand-over channel: what the hop loop has not
    // taken when the drain gives up on it is forwarded, not lost.
    let leftover = io.hop_rx.clone();
    let hops = glommio::spawn_local(hop_loop(g.clone(), io.hop_rx));
    let publisher = {
        let g = g.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(PUBLISH_EVERY).await;
                g.publish();
            }
        })
    };

    let mut batch = RecvBatch::new(g.plan.batch);
    let mut out = SendBatch::with_capacity(g.plan.batch);
    g.recv_loop(&listen, &io.stop, &mut batch, &mut out).await;
    let stopped = Instant::now();
    g.read_backlog(&mut batch, &mut out, stopped).await;

    // Drain: no more reads here; once every shard has stopped reading, the
    // hop channels close and the hop loops finish what was handed over.
    g.hop_txs.borrow_mut().clear();
    let deadline = stopped + g.plan.drain_timeout;
    let left = deadline.saturating_duration_since(Instant::now());
    let _ = glommio::timer::timeout(left, async {
        hops.await;
        Ok(())
    })
    .await;
    // What the hop loop left is forwarded. A shard still reading may keep
    // handing over until it drops its senders, which it does when its own
    // read of the backlog ends: take what comes until then (the channel
    // reports disconnected once empty), so nothing sits in it when this
    // handle goes. Bounded by [`HANDOVER_WAIT`] past the drain (a wedged
    // shard); past it, sends fail and the sender forwards them itself.
    let wait_until = deadline.max(Instant::now()) + HANDOVER_WAIT;
    loop {
        match leftover.try_recv() {
            Ok(p) => {
                if out.len() == g.plan.batch {
                    g.flush(&mut out);
                }
                out.push(&p);
                g.count(|c| {
                    c.hops_in += 1;
                    c.forwarded += 1;
                    c.drain_forwarded += 1;
                });
            }
            Err(flume::TryRecvError::Disconnected) => break,
            Err(flume::TryRecvError::Empty) if Instant::now() >= wait_until => break,
            Err(flume::TryRecvError::Empty) => {
                g.flush(&mut out);
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    g.flush(&mut out);
    drop(leftover);
    while g.inflight.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    // A claim still waiting here (a store call that outlived its own
    // deadline, a bug) is forwarded rather than dropped.
    g.give_up.close();
    let unwind = Instant::now() + Duration::from_millis(100);
    while g.inflight.get() > 0 && Instant::now() < unwind {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    g.count_left(&mut batch);
    drop(publisher);
    g.publish();
    let snapshot = *g.stats.lock().expect("not poisoned");
    ShardEnd {
        snapshot,
        abandoned: g.inflight.get(),
    }
}

/// Handed-over datagrams, claimed here in batches.
async fn hop_loop(g: Rc<GateShard>, rx: flume::Receiver<Box<[u8]>>) {
    let mut pkts: Vec<Box<[u8]>> = Vec::with_capacity(g.plan.batch);
    let mut out = SendBatch::with_capacity(g.plan.batch);
    let mut reactor_at = Instant::now();
    loop {
        // Await only while holding nothing: a drain that gives up on this
        // loop cancels it at an await, and a batch taken from the channel
        // but not yet claimed would be lost with it (the channel's rest is
        // forwarded by the drain).
        if reactor_at.elapsed() >= REACTOR_EVERY {
            step_aside().await;
            reactor_at = Instant::now();
        }
        let Ok(first) = rx.recv_async().await else {
            return;
        };
        pkts.push(first);
        while pkts.len() < g.plan.batch {
            match rx.try_recv() {
                Ok(p) => pkts.push(p),
                Err(_) => break,
            }
        }
        let t0 = Instant::now();
        let mut answered = 0;
        for p in &pkts {
            g.count(|c| c.hops_in += 1);
            let txid = &p[g.plan.txid_offset..g.plan.txid_offset + g.plan.txid_len];
            answered += g.claim(p, txid, &mut out, t0).await as u64;
        }
        g.claim_latency
            .borrow_mut()
            .record_n(t0.elapsed().as_nanos() as u64, answered);
        g.flush(&mut out);
        pkts.clear();
    }
}

impl GateShard {
    fn count(&self, f: impl FnOnce(&mut Counters)) {
        let mut c = self.counters.get();
        f(&mut c);
        self.counters.set(c);
    }

    async fn recv_loop(
        self: &Rc<Self>,
        listen: &glommio::net::UdpSocket,
        stop: &flume::Receiver<()>,
        batch: &mut RecvBatch,
        out: &mut SendBatch,
    ) {
        let fd = listen.as_raw_fd();
        let me = self.shard.index() as u32;
        let mut reactor_at = Instant::now();
        // The last read came back short: the queue is empty, so wait for
        // the next datagram instead of a read that would come back empty.
        let mut drained = false;
        loop {
            if !matches!(stop.try_recv(), Err(flume::TryRecvError::Empty)) {
                return;
            }
            let got = if drained {
                match self
                    .receive_waiting(listen, stop, batch, &mut reactor_at)
                    .await
                {
                    Some(got) => got,
                    None => return,
                }
            } else {
                batch.recv(fd)
            };
            let n = match got {
                Ok(n) => n,
                Err(e) => {
                    self.count(|c| c.recv_errors += 1);
                    tracing::debug!(shard = me, "receive: {e}");
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            };
            drained = n < batch.capacity();
            let t0 = self.handle_batch(batch, n, out).await;
            if !drained && t0.duration_since(reactor_at) >= self.reactor_every() {
                step_aside().await;
                reactor_at = Instant::now();
            }
        }
    }

    /// After the stop, what the socket still holds (the backlog the stop
    /// found, and what arrives meanwhile) would be thrown away with the
    /// socket at exit, unseen. So it is read without waiting (`MSG_DONTWAIT`)
    /// until the socket is empty, and claimed and forwarded like any
    /// traffic, for up to [`STOP_READ_DATAGRAMS_MAX`] datagrams and until
    /// [`STOP_READ_MAX`] after the stop. What is left then, or arrives later
    /// in the drain, [`GateShard::count_left`] counts at the end.
    async fn read_backlog(
        self: &Rc<Self>,
        batch: &mut RecvBatch,
        out: &mut SendBatch,
        stopped: Instant,
    ) {
        let claim_until = stopped + STOP_READ_MAX;
        let mut reactor_at = Instant::now();
        let mut read = 0u64;
        while read < STOP_READ_DATAGRAMS_MAX && Instant::now() < claim_until {
            let n = match batch.recv(self.listen_fd) {
                Ok(n) => n,
                Err(e) => {
                    self.count(|c| c.recv_errors += 1);
                    tracing::debug!(shard = self.shard.index(), "receive at stop: {e}");
                    return;
                }
            };
            read += n as u64;
            self.handle_batch(batch, n, out).await;
            if n < batch.capacity() {
                return;
            }
            // Claims waiting on the store and hand-overs need the reactor.
            if reactor_at.elapsed() >= REACTOR_EVERY {
                step_aside().await;
                reactor_at = Instant::now();
            }
        }
    }

    /// The last read of the socket before it closes: what is still queued
    /// (past [`GateShard::read_backlog`]'s bounds, or arrived later in the
    /// drain) is read and counted as dropped at stop, up to
    /// [`STOP_COUNT_DATAGRAMS_MAX`] datagrams and [`STOP_COUNT_MAX`], so the
    /// summary accounts for it; warns when there was any.
    fn count_left(&self, batch: &mut RecvBatch) {
        let until = Instant::now() + STOP_COUNT_MAX;
        let mut dropped = 0u64;
        let mut emptied = false;
        while dropped < STOP_COUNT_DATAGRAMS_MAX && Instant::now() < until {
            match batch.recv(self.listen_fd) {
                Ok(n) => {
                    dropped += n as u64;
                    if n < batch.capacity() {
                        emptied = true;
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        self.count(|c| c.dropped_at_stop += dropped);
        if dropped > 0 || !emptied {
            tracing::warn!(
                "shard {}: {dropped} datagrams still queued at the end of the drain were \
                 dropped (dropped_at_stop){}",
                self.shard.index(),
                if emptied {
                    ""
                } else {
                    "; more were still arriving and are lost with the socket"
                }
            );
        }
    }

    /// Claims (or hands over) the `n` datagrams of the last read and
    /// forwards the winners; returns when it began.
    async fn handle_batch(
        self: &Rc<Self>,
        batch: &RecvBatch,
        n: usize,
        out: &mut SendBatch,
    ) -> Instant {
        let end = self.plan.txid_offset + self.plan.txid_len;
        let me = self.shard.index() as u32;
        if n == 0 {
            return Instant::now();
        }
        // Copies of a TxID arrive packets apart, and between wake-ups
        // its tier-1 lines are often evicted: start every lookup's loads
        // first so the batch's misses overlap (measured: the lookup's
        // share of a 90 %-duplicate run fell from 12 % to 3 %).
        if n > 1 {
            let txids = self.shard.txids();
            for i in 0..n {
                if let Some(txid) = batch.get(i).get(self.plan.txid_offset..end) {
                    txids.prefetch(txid);
                }
            }
        }
        let t0 = Instant::now();
        let mut answered = 0;
        for i in 0..n {
            let pkt = batch.get(i);
            if pkt.len() < end {
                self.count(|c| {
                    c.received += 1;
                    c.short += 1;
                });
                continue;
            }
            self.count(|c| c.received += 1);
            let txid = &pkt[self.plan.txid_offset..end];
            if self.shards > 1 {
                let owner = route(txid, self.shards);
                if owner != me {
                    self.hop(owner as usize, pkt, out).await;
                    continue;
                }
            }
            answered += self.claim(pkt, txid, out, t0).await as u64;
        }
        self.claim_latency
            .borrow_mut()
            .record_n(t0.elapsed().as_nanos() as u64, answered);
        self.flush(out);
        t0
    }

    /// How long the receive loop may keep the reactor waiting: briefly while
    /// claims wait on the store or hand-overs may arrive, a slice while the
    /// socket is all this shard waits on.
    fn reactor_every(&self) -> Duration {
        if self.plan.socket_only && self.inflight.get() == 0 {
            REACTOR_SLICE
        } else {
            REACTOR_EVERY
        }
    }

    /// Waits until a datagram is queued and reads a batch; `None` on stop.
    /// A reactor sleep and wake-up costs glommio several `io_uring_enter`
    /// calls and often a `membarrier`, against one blocking `recvmmsg`: so
    /// while traffic flows and the socket is all this shard waits on (no
    /// hand-overs can arrive, no claim waits on the store), sleep in the
    /// read itself for up to a slice, and let the reactor turn at least once
    /// a slice. A quiet slice hands the wait to the reactor, so an idle
    /// shard sleeps as before.
    async fn receive_waiting(
        &self,
        listen: &glommio::net::UdpSocket,
        stop: &flume::Receiver<()>,
        batch: &mut RecvBatch,
        reactor_at: &mut Instant,
    ) -> Option<std::io::Result<usize>> {
        if self.plan.socket_only && self.inflight.get() == 0 {
            if reactor_at.elapsed() >= self.reactor_every() {
                step_aside().await;
                *reactor_at = Instant::now();
            }
            match batch.recv_waiting(listen.as_raw_fd()) {
                Ok(0) => {}
                got => return Some(got),
            }
        }
        // The wait below yields only when nothing is queued yet: under
        // steady traffic it completes at once, so it cannot be relied on to
        // let the runtime turn (store replies, hand-overs, timers).
        if reactor_at.elapsed() >= self.reactor_every() {
            step_aside().await;
            *reactor_at = Instant::now();
        }
        let mut wait = std::pin::pin!(wait_readable(listen, stop));
        let readable = match futures_lite::future::poll_once(&mut wait).await {
            Some(readable) => readable,
            None => {
                let readable = wait.await;
                *reactor_at = Instant::now();
                readable
            }
        };
        readable.then(|| batch.recv(listen.as_raw_fd()))
    }

    /// Hands `pkt` to its owner; waits while the owner's channel is full
    /// (back-pressure onto this socket), never drops it. An owner that has
    /// already finished draining cannot decide it: it is forwarded (fail
    /// open), counted as a drain forward.
    async fn hop(&self, owner: usize, pkt: &[u8], out: &mut SendBatch) {
        let tx = self.hop_txs.borrow().get(owner).cloned();
        if let Some(tx) = tx
            && tx.send_async(Box::from(pkt)).await.is_ok()
        {
            self.count(|c| c.hops_out += 1);
            return;
        }
        out.push(pkt);
        self.count(|c| {
            c.forwarded += 1;
            c.drain_forwarded += 1;
        });
    }

    /// Claims one datagram. Answered now: queued on `out` if forwarded,
    /// returns true. Waiting on the store: becomes a task with its own copy
    /// of the datagram, returns false.
    async fn claim(
        self: &Rc<Self>,
        pkt: &[u8],
        txid: &[u8],
        out: &mut SendBatch,
        t0: Instant,
    ) -> bool {
        let novel = match self.shard.txids().begin(txid) {
            Claim::Done(v) => {
                self.verdict(v, pkt, out);
                return true;
            }
            Claim::Novel(c) => c,
        };
        let novel = match self.shard.txids().finish_now(novel) {
            Ok(v) => {
                self.verdict(v, pkt, out);
                return true;
            }
            Err(c) => c,
        };
        // The store call runs in the task itself (one allocation, the
        // task's; no boxed future besides): it queues its request when the
        // task first runs, before this batch's writes go out.
        let (g, copy) = (self.clone(), Box::<[u8]>::from(pkt));
        self.inflight.set(self.inflight.get() + 1);
        glommio::spawn_local(async move {
            let give_up = async {
                let _ = g.give_up.acquire(1).await;
                None
            };
            let v = async { Some(g.shard.txids().finish(novel).await) }
                .or(give_up)
                .await;
            let mut one = SendBatch::with_capacity(1);
            match v {
                Some(v) => g.verdict(v, &copy, &mut one),
                None => {
                    one.push(&copy);
                    g.count(|c| {
                        c.forwarded += 1;
                        c.drain_forwarded += 1;
                    });
                }
            }
            g.flush(&mut one);
            g.claim_latency.borrow_mut().record(t0.elapsed());
            g.inflight.set(g.inflight.get() - 1);
        })
        .detach();
        false
    }

    #[inline]
    fn verdict(&self, v: Verdict, pkt: &[u8], out: &mut SendBatch) {
        if v.is_forward() {
            out.push(pkt);
            self.count(|c| c.forwarded += 1);
        }
    }

    /// Sends what `out` holds to every target, then empties it.
    fn flush(&self, out: &mut SendBatch) {
        if out.is_empty() {
            return;
        }
        for Target { sock, to, mode } in &self.targets {
            let mut m = mode.get();
            let (sent, err) = out.send(sock.as_raw_fd(), &mut m);
            if m != mode.get() {
                tracing::warn!("forward target {to} refused UDP GSO: one message per datagram");
                mode.set(m);
            }
            if let Some(e) = err {
                let failed = (out.len() - sent) as u64;
                self.count(|c| c.forward_errors += failed);
                tracing::debug!("forward to {to}: {e}");
            }
        }
        out.clear();
    }

    /// Copies this shard's figures where the admin thread reads them.
    fn publish(&self) {
        match super::udp::receive_drops(self.listen_fd) {
            Ok(now) => {
                let new = now.wrapping_sub(self.drops_read.replace(now));
                self.count(|c| c.receive_dropped += u64::from(new));
            }
            Err(e) => tracing::debug!("reading the socket's drop count: {e}"),
        }
        let c = self.counters.get();
        let txids = self.shard.txids();
        let up_of = self.shard.backend().map_or((0, 0), |b| b.connections_up());
        let snap = ShardSnapshot {
            published_ms: crate::clock::precise_ms(),
            received: c.received,
            forwarded: c.forwarded,
            forward_errors: c.forward_errors,
            short: c.short,
            hops_out: c.hops_out,
            hops_in: c.hops_in,
            recv_errors: c.recv_errors,
            drain_forwarded: c.drain_forwarded,
            receive_dropped: c.receive_dropped,
            dropped_at_stop: c.dropped_at_stop,
            receive_buffer_bytes: self.receive_buffer_bytes,
            claims: txids.counters(),
            tier1_entries: txids.tier1_len() as u64,
            tier1_evictions: txids.tier1_evictions(),
            store_connections: up_of.1,
            store_connections_up: up_of.0,
            store_evictions: self.shard.backend().and_then(|b| b.evictions()),
            claim_latency: *self.claim_latency.borrow(),
            backend_latency: txids.backend_latency(),
            connections: self
                .shard
                .backend()
                .map(|b| b.connection_counters())
                .unwrap_or_default(),
        };
        *self.stats.lock().expect("not poisoned") = snap;
    }
}

/// Waits until a datagram is queued (a 1-byte peek, which leaves it there)
/// or the stop signal; false on stop.
async fn wait_readable(listen: &glommio::net::UdpSocket, stop: &flume::Receiver<()>) -> bool {
    let readable = async {
        let mut byte = [0u8; 1];
        if let Err(e) = listen.peek_from(&mut byte).await {
            tracing::debug!("waiting for datagrams: {e}");
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        true
    };
    let stopped = async {
        let _ = stop.recv_async().await;
        false
    };
    readable.or(stopped).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stepping_aside_yields_even_when_its_timer_is_due_before_its_first_poll() {
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let mut step = step_aside();
                // Longer than the timer lasts: a plain timer would now
                // complete on its first poll without yielding.
                std::thread::sleep(Duration::from_millis(2));
                let first = futures_lite::future::poll_once(&mut step).await;
                assert!(first.is_none(), "the first poll must yield to the executor");
                glommio::timer::timeout(Duration::from_secs(5), async {
                    step.await;
                    Ok(())
                })
                .await
                .expect("the reactor fires it");
            });
    }

    #[test]
    fn a_loop_that_only_steps_aside_lets_other_timers_fire() {
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let fired = Rc::new(Cell::new(false));
                let f = fired.clone();
                glommio::spawn_local(async move {
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                    f.set(true);
                })
                .detach();
                let start = Instant::now();
                let mut steps = 0u32;
                while !fired.get() && start.elapsed() < Duration::from_secs(5) {
                    // Busy work between the timer's creation and its first
                    // poll, as after a long batch of datagrams.
                    let step = step_aside();
                    let spin = Instant::now();
                    while spin.elapsed() < Duration::from_micros(50) {
                        std::hint::spin_loop();
                    }
                    step.await;
                    steps += 1;
                }
                assert!(
                    fired.get(),
                    "the other task's timer never fired ({steps} steps)"
                );
            });
    }
}
