//! A protocol-level Aerospike test server: no Aerospike server can be
//! installed on these machines, so integration tests talk to this one. It
//! speaks the wire protocol through our own codec (`parse_request`,
//! `encode_reply`, `parse_info_request`, `encode_info_reply`) and implements
//! the semantics txgate relies on (see `shared/notes/aerospike-wire.md`).
//!
//! Shape: `nodes` listeners (1 or 3) on `127.0.0.1:0`, one accept thread
//! each, one thread per connection. Every loop is bounded: sockets have a
//! 50 ms read timeout and every thread polls a stop flag, so `Drop` ends all
//! of them. Each connection handles one request at a time and answers in
//! order, as the real server does, so pipelined requests get FIFO replies.
//!
//! Cluster model: partitions `0..4096`, node `i` masters the partitions `p`
//! with `p % nodes == i` (shifted by one node while [`AeroServer::set_misroute`]
//! is on). All nodes share ONE record store, so a request that lands on a
//! node that does not master its partition is still served, exactly as the
//! real server proxies it; such requests are counted by
//! [`AeroServer::proxied`]. No replication, no migrations.
//!
//! Semantics (record requests, proto type 3):
//! - records are keyed by `(namespace, set, digest)`; expired records count
//!   as absent everywhere and are removed lazily;
//! - another namespace than the configured one → 20 (NAMESPACE_NOT_FOUND);
//!   no or a malformed digest → 4 (PARAMETER);
//! - write (info2 WRITE): with no ops → 4; CREATE_ONLY on a live record → 5;
//!   UPDATE_ONLY / REPLACE_ONLY on an absent one → 2; CREATE_OR_REPLACE and
//!   REPLACE_ONLY replace all bins, a plain write merges them; a bin written
//!   with the null particle is removed; ops other than WRITE → 4;
//! - record TTL: `0xFFFFFFFF` never expires; `0` = the namespace default,
//!   which here is "never" (`default-ttl 0`); `0xFFFFFFFE` keeps the current
//!   expiry; more than 10 years → 4; else whole seconds, counted as the real
//!   server counts them: the void time is the current whole second plus the
//!   TTL, and a record expires once the clock's whole second passes it, so
//!   it lives between TTL and TTL + 1 s;
//! - a record over 1 MiB (bins and their names; the real server's
//!   `max-record-size` default and ceiling) → 13 (RECORD_TOO_BIG);
//! - delete (info2 WRITE|DELETE) → 0 when a live record was removed, else 2;
//! - read (info1 READ) → 2 when absent, else 0 with the bins named by READ
//!   ops (all with GET_ALL, none with GET_NO_BINS); a read never touches the
//!   TTL. Replies carry the generation and the expiry in seconds since
//!   2010-01-01 UTC (0 = never).
//!
//! Info commands (proto type 1): `node`, `partition-generation`,
//! `replicas`, `replicas-master`, `peers-clear-std`, `peers-generation`,
//! `cluster-name` ("txgate-test"), `build` ("8.1.0.0"), `status` ("ok"),
//! `features`, `partitions` (4096), `namespaces`, `service-clear-std`;
//! anything else is answered `ERROR:4:not supported` (the notes' form
//! `ERROR:<code>:<msg>`). An unparseable frame closes the connection.
//! While [`set_forming`] is on, `partition-generation` is -1 and every record
//! request is answered 11 (UNAVAILABLE) while `replicas` already lists each
//! node's partitions: the last phase of a real server's first second or two
//! (Community Edition 8.1 lists no namespace, then the namespace with no
//! partitions, then this, until its cluster forms and the generation reads
//! 0).
//!
//! Fault knobs (atomics, flip them while traffic flows): [`set_delay`],
//! [`drop_connections`], [`set_key_busy`], [`set_forbidden_ttl`],
//! [`set_misroute`], [`set_forming`], [`set_bad_replicas`]. [`requests`]
//! counts record requests (not info).
//!
//! [`set_delay`]: AeroServer::set_delay
//! [`drop_connections`]: AeroServer::drop_connections
//! [`set_key_busy`]: AeroServer::set_key_busy
//! [`set_forbidden_ttl`]: AeroServer::set_forbidden_ttl
//! [`set_misroute`]: AeroServer::set_misroute
//! [`set_forming`]: AeroServer::set_forming
//! [`set_bad_replicas`]: AeroServer::set_bad_replicas
//! [`requests`]: AeroServer::requests

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use txgate::cache::aerospike::codec::{
    self, PARTICLE_NULL, PARTITION_BITMAP_LEN, PARTITIONS, PROTO_TYPE_INFO, PROTO_TYPE_MSG,
    ParsedRequest, REQUEST_TTL_KEEP, REQUEST_TTL_NEVER, ResultCode,
};

/// Socket read timeout: how often every connection thread sees the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// A client that does not read its replies for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest record TTL the server accepts (10 years).
const TTL_MAX_S: u32 = 10 * 365 * 24 * 3600;
/// The real server's `max-record-size` default (also its ceiling).
const RECORD_BYTES_MAX: usize = 1 << 20;
/// 2010-01-01 UTC in Unix seconds: the epoch of reply expirations.
const CITRUSLEAF_EPOCH: u64 = 1_262_304_000;
/// The node id of the (first) peer [`AeroServer::list_phantom`] adds.
pub const PHANTOM_ID: &str = "BB9FFFFFFFFFFFF";
/// What a node answers for `replicas` while [`AeroServer::set_bad_replicas`]
/// is on for it: the namespace with a bitmap that is not 512 bytes.
pub const BAD_REPLICAS_BITMAP: &str = "not-a-bitmap";

/// The cluster name every node reports.
pub const CLUSTER_NAME: &str = "txgate-test";
/// The build every node reports.
pub const BUILD: &str = "8.1.0.0";
/// Result code of a namespace the server does not have.
pub const NAMESPACE_NOT_FOUND: u8 = 20;
const OP_READ: u8 = 1;
const OP_WRITE: u8 = 2;

type Key = (Vec<u8>, Vec<u8>, [u8; codec::DIGEST_LEN]);

/// One stored record.
#[derive(Debug, Clone)]
pub struct Record {
    /// `(name, particle type, value)`.
    pub bins: Vec<(Vec<u8>, u8, Vec<u8>)>,
    pub expires_at: Option<Instant>,
    pub generation: u32,
}

impl Record {
    fn live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }

    /// Seconds since 2010-01-01 UTC, 0 = never: the last whole second in
    /// which the record is still live (it expires as the next one begins).
    fn void_time(&self, now: Instant) -> u32 {
        let Some(at) = self.expires_at else {
            return 0;
        };
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            + at.saturating_duration_since(now);
        let last = unix.saturating_sub(Duration::from_millis(500)).as_secs();
        (last.saturating_sub(CITRUSLEAF_EPOCH)).min(u64::from(u32::MAX)) as u32
    }
}

/// How long a record written now with a TTL of `ttl_s` stays live on a real
/// server: its void time is the current whole second plus the TTL, and it
/// expires when the clock's whole second passes that, so it lives between
/// `ttl_s` and `ttl_s + 1` seconds.
fn expiry_delay(ttl_s: u64) -> Duration {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(wall.as_secs() + ttl_s + 1) - wall
}

struct Shared {
    namespace: String,
    nodes: usize,
    /// Nodes `0..active` form the cluster (master partitions, appear in
    /// peers); the rest listen but stay outside until [`AeroServer::join_next`].
    active: AtomicUsize,
    peers_generation: AtomicU32,
    ports: Mutex<Vec<u16>>,
    store: Mutex<HashMap<Key, Record>>,
    stop: AtomicBool,
    delay_us: AtomicU64,
    key_busy: AtomicBool,
    forbidden_ttl: AtomicBool,
    misroute: AtomicBool,
    forming: AtomicBool,
    /// Info requests for `replicas` still to be answered by dropping the
    /// connection (see [`AeroServer::fail_replicas`]).
    fail_replicas: AtomicU64,
    /// Nodes that left with [`AeroServer::leave_last`]: each answers as a
    /// cluster of its own (no peers, every partition its own).
    left: Vec<AtomicBool>,
    /// Nodes answering an unparsable `replicas` (see
    /// [`AeroServer::set_bad_replicas`]).
    bad_replicas: Vec<AtomicBool>,
    /// Peers every node lists that are not ours (see
    /// [`AeroServer::list_phantoms`]).
    phantoms: Mutex<Vec<SocketAddr>>,
    /// `replicas` reads answered, per node; the node (+1) whose read the
    /// knob last refused, and its answered count then.
    replicas_served: Vec<AtomicU64>,
    replicas_failed_on: AtomicUsize,
    replicas_served_at_failure: AtomicU64,
    partition_generation: AtomicU32,
    requests: AtomicU64,
    /// Record requests per node.
    node_requests: Vec<AtomicU64>,
    proxied: AtomicU64,
    next_conn: AtomicU64,
    conns: Mutex<HashMap<u64, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The node that masters `p` in the current (reported) map.
    fn master_of(&self, p: usize) -> usize {
        let n = self.active.load(Ordering::SeqCst).max(1);
        let shift = usize::from(self.misroute.load(Ordering::Relaxed));
        (p % n + n - shift % n) % n
    }

    fn node_id(i: usize) -> String {
        format!("BB9{:012X}", i + 1)
    }

    fn port(&self, i: usize) -> u16 {
        lock(&self.ports)[i]
    }
}

/// The test server; see the module docs. Everything stops on `Drop`.
pub struct AeroServer {
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
    accept_threads: Vec<JoinHandle<()>>,
}

impl AeroServer {
    /// `nodes` (1 or 3) nodes on loopback serving `namespace`.
    pub fn start(nodes: usize, namespace: &str) -> AeroServer {
        AeroServer::start_partial(nodes, nodes, namespace)
    }

    /// `nodes` nodes listening, of which the first `active` form the
    /// cluster; the others join one by one with [`AeroServer::join_next`].
    pub fn start_partial(nodes: usize, active: usize, namespace: &str) -> AeroServer {
        assert!(nodes >= 1, "at least one node");
        assert!((1..=nodes).contains(&active), "1..=nodes active");
        let listeners: Vec<TcpListener> = (0..nodes)
            .map(|_| {
                // A deep backlog: a client opening hundreds of connections at
                // once must not overflow it while the accept loop sleeps.
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .expect("socket");
                s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
                    .expect("bind 127.0.0.1:0");
                s.listen(1024).expect("listen");
                let l: TcpListener = s.into();
                l.set_nonblocking(true).expect("nonblocking listener");
                l
            })
            .collect();
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| l.local_addr().expect("local addr"))
            .collect();
        let shared = Arc::new(Shared {
            namespace: namespace.to_owned(),
            nodes,
            active: AtomicUsize::new(active),
            peers_generation: AtomicU32::new(1),
            ports: Mutex::new(addrs.iter().map(SocketAddr::port).collect()),
            store: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            key_busy: AtomicBool::new(false),
            forbidden_ttl: AtomicBool::new(false),
            misroute: AtomicBool::new(false),
            forming: AtomicBool::new(false),
            fail_replicas: AtomicU64::new(0),
            left: (0..nodes).map(|_| AtomicBool::new(false)).collect(),
            bad_replicas: (0..nodes).map(|_| AtomicBool::new(false)).collect(),
            phantoms: Mutex::new(Vec::new()),
            replicas_served: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
            replicas_failed_on: AtomicUsize::new(0),
            replicas_served_at_failure: AtomicU64::new(0),
            partition_generation: AtomicU32::new(1),
            requests: AtomicU64::new(0),
            node_requests: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
            proxied: AtomicU64::new(0),
            next_conn: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let accept_threads = listeners
            .into_iter()
            .enumerate()
            .map(|(node, listener)| {
                let shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name(format!("aero-accept-{node}"))
                    .spawn(move || accept_loop(&shared, node, &listener))
                    .expect("spawn accept thread")
            })
            .collect();
        AeroServer {
            shared,
            addrs,
            accept_threads,
        }
    }

    /// `127.0.0.1:port` of every node, node 0 first.
    pub fn seeds(&self) -> Vec<String> {
        self.addrs.iter().map(ToString::to_string).collect()
    }

    /// Address of node `i`.
    pub fn node_addr(&self, i: usize) -> SocketAddr {
        self.addrs[i]
    }

    /// The node id node `i` reports for `node` (e.g. `BB9000000000001`).
    pub fn node_id(&self, i: usize) -> String {
        Shared::node_id(i)
    }

    pub fn nodes(&self) -> usize {
        self.shared.nodes
    }

    /// The node that masters partition `p` in the map currently reported.
    pub fn master_of(&self, p: u16) -> usize {
        self.shared.master_of(usize::from(p))
    }

    /// Record requests node `i` has served.
    pub fn requests_to(&self, i: usize) -> u64 {
        self.shared.node_requests[i].load(Ordering::Relaxed)
    }

    /// Nodes in the cluster now.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// The next listening node joins the cluster: it appears in every
    /// node's `peers-clear-std`, partitions are rebalanced over the larger
    /// cluster, and `peers-generation` and `partition-generation` move on.
    pub fn join_next(&self) {
        let s = &self.shared;
        let now = s.active.load(Ordering::SeqCst);
        assert!(now < s.nodes, "every node has joined already");
        s.active.store(now + 1, Ordering::SeqCst);
        s.peers_generation.fetch_add(1, Ordering::SeqCst);
        s.partition_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The last node of the cluster leaves it and carries on as a cluster
    /// of its own: it lists no peers and claims every partition (a node
    /// removed, then restarted alone), while the others rebalance over one
    /// node fewer and their generations move on.
    pub fn leave_last(&self) {
        let s = &self.shared;
        let now = s.active.load(Ordering::SeqCst);
        assert!(now > 1, "the last node cannot leave");
        s.left[now - 1].store(true, Ordering::SeqCst);
        s.active.store(now - 1, Ordering::SeqCst);
        s.peers_generation.fetch_add(1, Ordering::SeqCst);
        s.partition_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The node that left last (with [`AeroServer::leave_last`]) comes back
    /// to the cluster at its old address: listed by every node again,
    /// partitions rebalanced over it, generations moved on.
    pub fn rejoin_last_left(&self) {
        let s = &self.shared;
        let now = s.active.load(Ordering::SeqCst);
        assert!(
            s.left[now].load(Ordering::SeqCst),
            "node {now} has not left"
        );
        s.left[now].store(false, Ordering::SeqCst);
        s.active.store(now + 1, Ordering::SeqCst);
        s.peers_generation.fetch_add(1, Ordering::SeqCst);
        s.partition_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Node `i` moves to a new port, keeping its node id (a pod rescheduled
    /// with a fixed node id): it stops listening on the old one and drops
    /// its connections there, every peer list names the new address, and
    /// `peers-generation` moves on. Returns the new address.
    pub fn move_node(&mut self, i: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        lock(&self.shared.ports)[i] = addr.port();
        self.addrs[i] = addr;
        let shared = Arc::clone(&self.shared);
        self.accept_threads.push(
            thread::Builder::new()
                .name(format!("aero-accept-{i}-moved"))
                .spawn(move || accept_loop(&shared, i, &listener))
                .expect("spawn accept thread"),
        );
        self.shared.peers_generation.fetch_add(1, Ordering::SeqCst);
        addr
    }

    /// From now on every node lists, besides its real peers, a peer with id
    /// [`PHANTOM_ID`] at `addr` (which the test controls: e.g. a listener
    /// that never answers), and `peers-generation` moves on.
    pub fn list_phantom(&self, addr: SocketAddr) {
        self.list_phantoms(&[addr]);
    }

    /// [`AeroServer::list_phantom`] for several peers: the `i`th has id
    /// [`AeroServer::phantom_id`]`(i)` and address `addrs[i]`.
    pub fn list_phantoms(&self, addrs: &[SocketAddr]) {
        *lock(&self.shared.phantoms) = addrs.to_vec();
        self.shared.peers_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The node id of the `i`th phantom peer ([`PHANTOM_ID`] for the first).
    pub fn phantom_id(i: usize) -> String {
        format!("BB9FFFFFFFF{:04X}", 0xFFFF - i)
    }

    /// While on, node `i` answers `replicas` with a value that does not
    /// parse (the namespace, a valid regime and count, then
    /// [`BAD_REPLICAS_BITMAP`]); `partition-generation` moves on at every
    /// change, so a client reads it again.
    pub fn set_bad_replicas(&self, i: usize, on: bool) {
        if self.shared.bad_replicas[i].swap(on, Ordering::SeqCst) != on {
            self.shared
                .partition_generation
                .fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Sleep this long before each reply (record and info alike).
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Closes (shuts down) every current connection; new ones are accepted.
    pub fn drop_connections(&self) {
        for stream in lock(&self.shared.conns).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// While on, every write (including deletes) answers 14 KEY_BUSY.
    pub fn set_key_busy(&self, on: bool) {
        self.shared.key_busy.store(on, Ordering::Relaxed);
    }

    /// While on, writes with a TTL (1..=0xFFFFFFFD s) answer 22 FORBIDDEN, as
    /// a namespace with `nsup-period 0` does.
    pub fn set_forbidden_ttl(&self, on: bool) {
        self.shared.forbidden_ttl.store(on, Ordering::Relaxed);
    }

    /// While on, node `i` reports (in `replicas`) the partitions node `i+1`
    /// had, as if the map had changed; `partition-generation` is bumped on
    /// every change of this knob. Requests landing on a node that is not the
    /// master in the currently reported map are served and counted in
    /// [`proxied`](Self::proxied).
    /// The next `n` info requests for `replicas` (any node) are answered
    /// by dropping the connection.
    pub fn fail_replicas(&self, n: u64) {
        self.shared.fail_replicas.store(n, Ordering::SeqCst);
    }

    /// Whether the node whose `replicas` read [`AeroServer::fail_replicas`]
    /// last refused has answered one since (`None`: nothing refused yet).
    pub fn replicas_reread_after_failure(&self) -> Option<bool> {
        let s = &self.shared;
        let node = s.replicas_failed_on.load(Ordering::SeqCst).checked_sub(1)?;
        Some(
            s.replicas_served[node].load(Ordering::SeqCst)
                > s.replicas_served_at_failure.load(Ordering::SeqCst),
        )
    }

    pub fn set_misroute(&self, on: bool) {
        if self.shared.misroute.swap(on, Ordering::SeqCst) != on {
            self.shared
                .partition_generation
                .fetch_add(1, Ordering::SeqCst);
        }
    }

    /// While on, the cluster is forming: `partition-generation` reads -1 and
    /// record requests answer UNAVAILABLE; turning it off bumps the
    /// generation.
    pub fn set_forming(&self, on: bool) {
        if self.shared.forming.swap(on, Ordering::SeqCst) && !on {
            self.shared
                .partition_generation
                .fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Record requests (proto type 3) received so far, on all nodes.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Record requests that landed on a node not mastering their partition.
    pub fn proxied(&self) -> u64 {
        self.shared.proxied.load(Ordering::Relaxed)
    }

    /// Connections accepted so far, on all nodes, closed ones included.
    pub fn connections_opened(&self) -> u64 {
        self.shared.next_conn.load(Ordering::Relaxed)
    }

    /// Current connections on all nodes.
    pub fn connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Live records in the namespace (expired ones not counted).
    pub fn live_records(&self) -> usize {
        let now = Instant::now();
        lock(&self.shared.store)
            .values()
            .filter(|r| r.live(now))
            .count()
    }

    /// Removes every record.
    pub fn clear(&self) {
        lock(&self.shared.store).clear();
    }
}

impl Drop for AeroServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.drop_connections();
        for t in self.accept_threads.drain(..) {
            let _ = t.join();
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, node: usize, listener: &TcpListener) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    // Ends (closing the listener) when the node moves to another port.
    while !shared.stopped() && shared.port(node) == port {
        match listener.accept() {
            Ok((stream, _)) => {
                let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                let Ok(registered) = stream.try_clone() else {
                    continue;
                };
                lock(&shared.conns).insert(id, registered);
                let conn_shared = Arc::clone(shared);
                let spawned = thread::Builder::new()
                    .name(format!("aero-conn-{node}-{id}"))
                    .spawn(move || {
                        let _ = serve(&conn_shared, node, port, stream);
                        lock(&conn_shared.conns).remove(&id);
                    });
                match spawned {
                    Ok(handle) => {
                        let mut threads = lock(&shared.threads);
                        threads.retain(|t| !t.is_finished());
                        threads.push(handle);
                    }
                    Err(_) => {
                        lock(&shared.conns).remove(&id);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// One connection: read, answer every complete frame in order, repeat.
fn serve(shared: &Shared, node: usize, port: u16, mut stream: TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    // A node that moved to another port drops its old connections.
    while !shared.stopped() && shared.port(node) == port {
        // Answer every complete frame already buffered, one at a time.
        loop {
            out.clear();
            let used = match buf.get(1) {
                None => break,
                Some(&PROTO_TYPE_MSG) => match codec::parse_request(&buf) {
                    Ok(None) => break,
                    Ok(Some((req, used))) => {
                        shared.requests.fetch_add(1, Ordering::Relaxed);
                        shared.node_requests[node].fetch_add(1, Ordering::Relaxed);
                        let (code, generation, expiration, bins) = handle(shared, node, &req);
                        let bins: Vec<(&[u8], u8, &[u8])> =
                            bins.iter().map(|(n, p, v)| (&n[..], *p, &v[..])).collect();
                        codec::encode_reply(
                            &mut out,
                            ResultCode(code),
                            generation,
                            expiration,
                            &bins,
                        )
                        .map_err(io::Error::other)?;
                        used
                    }
                    Err(e) => return Err(io::Error::other(e)),
                },
                Some(&PROTO_TYPE_INFO) => match codec::parse_info_request(&buf) {
                    Ok(None) => break,
                    Ok(Some((commands, used))) => {
                        if commands.iter().any(|c| c == "replicas")
                            && shared
                                .fail_replicas
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok()
                        {
                            shared.replicas_failed_on.store(node + 1, Ordering::SeqCst);
                            shared.replicas_served_at_failure.store(
                                shared.replicas_served[node].load(Ordering::SeqCst),
                                Ordering::SeqCst,
                            );
                            return Err(io::Error::other("replicas refused (fault knob)"));
                        }
                        if commands.iter().any(|c| c == "replicas") {
                            shared.replicas_served[node].fetch_add(1, Ordering::SeqCst);
                        }
                        let values: Vec<String> = commands
                            .iter()
                            .map(|c| info_value(shared, node, c))
                            .collect();
                        let pairs: Vec<(&str, &str)> = commands
                            .iter()
                            .zip(&values)
                            .map(|(c, v)| (c.as_str(), v.as_str()))
                            .collect();
                        codec::encode_info_reply(&mut out, &pairs);
                        used
                    }
                    Err(e) => return Err(io::Error::other(e)),
                },
                Some(&other) => {
                    return Err(io::Error::other(format!("proto type {other}")));
                }
            };
            buf.drain(..used);
            delay(shared);
            if shared.stopped() {
                return Ok(());
            }
            stream.write_all(&out)?;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sleeps the configured delay in slices, so a stop is not held up.
fn delay(shared: &Shared) {
    let us = shared.delay_us.load(Ordering::Relaxed);
    if us == 0 {
        return;
    }
    let until = Instant::now() + Duration::from_micros(us);
    while !shared.stopped() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        thread::sleep(left.min(POLL));
    }
}

type Bins = Vec<(Vec<u8>, u8, Vec<u8>)>;

/// Executes one record request: `(result code, generation, expiration, bins)`.
fn handle(shared: &Shared, node: usize, req: &ParsedRequest) -> (u8, u32, u32, Bins) {
    let fail = |code: u8| (code, 0, 0, Vec::new());
    if shared.forming.load(Ordering::SeqCst) {
        return fail(ResultCode::UNAVAILABLE.0);
    }
    if req.namespace.as_deref() != Some(shared.namespace.as_bytes()) {
        return fail(NAMESPACE_NOT_FOUND);
    }
    let Some(digest) = req.digest() else {
        return fail(ResultCode::PARAMETER.0);
    };
    if shared.master_of(usize::from(codec::partition_id(&digest))) != node {
        shared.proxied.fetch_add(1, Ordering::Relaxed);
    }
    let key: Key = (
        shared.namespace.as_bytes().to_vec(),
        req.set.clone().unwrap_or_default(),
        digest,
    );
    let now = Instant::now();
    let mut store = lock(&shared.store);
    if store.get(&key).is_some_and(|r| !r.live(now)) {
        store.remove(&key);
    }
    if req.is_write() {
        if shared.key_busy.load(Ordering::Relaxed) {
            return fail(ResultCode::KEY_BUSY.0);
        }
        if req.is_delete() {
            return match store.remove(&key) {
                Some(_) => (0, 0, 0, Vec::new()),
                None => fail(ResultCode::NOT_FOUND.0),
            };
        }
        if req.ops.is_empty() || req.ops.iter().any(|o| o.op != OP_WRITE) {
            return fail(ResultCode::PARAMETER.0);
        }
        let ttl = req.record_ttl;
        if ttl != 0 && ttl < REQUEST_TTL_KEEP && ttl > TTL_MAX_S {
            return fail(ResultCode::PARAMETER.0);
        }
        if shared.forbidden_ttl.load(Ordering::Relaxed) && ttl != 0 && ttl < REQUEST_TTL_KEEP {
            return fail(ResultCode::FORBIDDEN.0);
        }
        let existing = store.get(&key);
        if req.is_create_only() && existing.is_some() {
            return fail(ResultCode::RECORD_EXISTS.0);
        }
        if (req.is_update_only() || req.is_replace_only()) && existing.is_none() {
            return fail(ResultCode::NOT_FOUND.0);
        }
        let expires_at = match ttl {
            0 | REQUEST_TTL_NEVER => None,
            REQUEST_TTL_KEEP => existing.and_then(|r| r.expires_at),
            s => Some(now + expiry_delay(u64::from(s))),
        };
        let replace = req.is_create_or_replace() || req.is_replace_only();
        let mut bins: Bins = match existing {
            Some(r) if !replace => r.bins.clone(),
            _ => Vec::new(),
        };
        for op in &req.ops {
            let name = op.name.as_bytes();
            bins.retain(|(n, _, _)| n != name);
            if op.particle_type != PARTICLE_NULL {
                bins.push((name.to_vec(), op.particle_type, op.value.clone()));
            }
        }
        let size: usize = bins.iter().map(|(n, _, v)| n.len() + v.len()).sum();
        if size > RECORD_BYTES_MAX {
            return fail(ResultCode::RECORD_TOO_BIG.0);
        }
        let generation = existing.map_or(1, |r| r.generation.wrapping_add(1));
        let record = Record {
            bins,
            expires_at,
            generation,
        };
        let expiration = record.void_time(now);
        store.insert(key, record);
        return (0, generation, expiration, Vec::new());
    }
    if req.is_read() {
        let Some(record) = store.get(&key) else {
            return fail(ResultCode::NOT_FOUND.0);
        };
        let bins: Bins = if req.is_get_no_bins() {
            Vec::new()
        } else if req.is_get_all() {
            record.bins.clone()
        } else {
            req.ops
                .iter()
                .filter(|o| o.op == OP_READ)
                .filter_map(|o| {
                    record
                        .bins
                        .iter()
                        .find(|(n, _, _)| n == o.name.as_bytes())
                        .cloned()
                })
                .collect()
        };
        return (0, record.generation, record.void_time(now), bins);
    }
    fail(ResultCode::PARAMETER.0)
}

/// The `replicas` bitmap of node `node`'s masters, base64.
fn masters_b64(shared: &Shared, node: usize) -> String {
    let mut bytes = [0u8; PARTITION_BITMAP_LEN];
    for p in (0..PARTITIONS).filter(|&p| shared.master_of(p) == node) {
        bytes[p >> 3] |= 0x80 >> (p & 7);
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn info_value(shared: &Shared, node: usize, command: &str) -> String {
    let ns = &shared.namespace;
    match command {
        "node" => Shared::node_id(node),
        "partition-generation" if shared.forming.load(Ordering::SeqCst) => "-1".to_owned(),
        "partition-generation" => shared
            .partition_generation
            .load(Ordering::SeqCst)
            .to_string(),
        // One namespace, so no `;` at all: the real server chomps the
        // trailing one, and the official client rejects an empty entry.
        "replicas" if shared.bad_replicas[node].load(Ordering::SeqCst) => {
            format!("{ns}:0,1,{BAD_REPLICAS_BITMAP}")
        }
        "replicas" | "replicas-all" if shared.left[node].load(Ordering::SeqCst) => {
            let all = [0xFFu8; PARTITION_BITMAP_LEN];
            format!(
                "{ns}:0,1,{}",
                base64::engine::general_purpose::STANDARD.encode(all)
            )
        }
        "replicas" | "replicas-all" => format!("{ns}:0,1,{}", masters_b64(shared, node)),
        "replicas-master" => format!("{ns}:{}", masters_b64(shared, node)),
        "peers-clear-std" if shared.left[node].load(Ordering::SeqCst) => {
            format!("1,{},[]", shared.port(node))
        }
        "peers-clear-std" => {
            let mut peers: Vec<String> = (0..shared.active.load(Ordering::SeqCst))
                .filter(|&i| i != node)
                .map(|i| format!("[{},,[127.0.0.1:{}]]", Shared::node_id(i), shared.port(i)))
                .collect();
            for (i, a) in lock(&shared.phantoms).iter().enumerate() {
                let id = AeroServer::phantom_id(i);
                peers.push(format!("[{id},,[{}:{}]]", a.ip(), a.port()));
            }
            format!("1,{},[{}]", shared.port(node), peers.join(","))
        }
        "peers-generation" => shared.peers_generation.load(Ordering::SeqCst).to_string(),
        "cluster-name" => CLUSTER_NAME.to_owned(),
        "build" => BUILD.to_owned(),
        "status" => "ok".to_owned(),
        "features" => "batch-any;batch-index;blob-bits;cluster-stable;float;geo;peers;\
                       pipelining;pquery;pscans;query-show;relaxed-sc;replicas;\
                       replicas-all;replicas-master;truncate-namespace;udf"
            .to_owned(),
        "partitions" => PARTITIONS.to_string(),
        "namespaces" => ns.clone(),
        "service-clear-std" | "service" => format!("127.0.0.1:{}", shared.port(node)),
        _ => "ERROR:4:not supported".to_owned(),
    }
}
