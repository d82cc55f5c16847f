//! The Redis-protocol backend: per shard, one pipelined connection per
//! server node (glommio TCP), RESP2, op timeouts from one per-shard sweep.
//!
//! - `set_nx` = `SET k v NX [PX ms]`; `set` = `SET k v [PX ms]`; `get`, `del`;
//!   `healthy` = `PING` with its own timeout, off the hot path.
//! - No false duplicates after an ambiguous failure (a timeout, a connection
//!   lost with the request in flight): `set_nx` is never retried blindly.
//!   Where the server has `SET … NX … GET` (Redis ≥ 7.0, detected at open) one
//!   retry is safe because the value is unique per claim: a reply equal to our
//!   own value means the first attempt won.
//! - [`open`] dials and verifies (PING, AUTH, version, cluster probe) within
//!   the dial timeout and fails closed with a specific error.

pub mod cluster;
pub mod resp;
pub mod tls;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream, ToSocketAddrs};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::net::TcpStream;

use super::{CacheError, Config};
use crate::pipeline::{CallError, Connector, Pipeline, PipelineConfig, Protocol};
use cluster::{
    NodeAddr, Redirect, SlotMap, hash_slot, parse_cluster_shards, parse_cluster_slots,
    parse_info_field as info_field, parse_redirect, parse_version,
};
use resp::{Reply, decode_reply, encode_command};

/// Shortest gap between two slot-map refreshes of one shard.
const REFRESH_GAP: Duration = Duration::from_millis(100);

/// How often a shard re-reads the slot map while a master's connection is
/// down: a failover promotes a replica only after the cluster's node
/// timeout, and nothing else would tell this shard (the dead master sends no
/// `MOVED`, and failed redials count no new disconnects).
const DOWN_REFRESH_EVERY: Duration = Duration::from_secs(1);

/// RESP2 as the pipeline's reply codec.
pub struct Resp;

impl Protocol for Resp {
    type Reply = Reply;
    type Error = resp::RespError;
    fn decode(buf: &[u8]) -> Result<Option<(Reply, usize)>, resp::RespError> {
        decode_reply(buf)
    }
}

/// What `open` learned about the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// `redis_version` from INFO, e.g. (7, 0, 15); (0, 0, 0) when absent.
    pub version: (u32, u32, u32),
    /// `SET … NX … GET` is available (Redis ≥ 7.0): one safe retry.
    pub nx_get: bool,
    /// `cluster_enabled:1`.
    pub cluster: bool,
}

/// The process-wide Redis backend: resolved address, credentials, what the
/// server is. Cloned into every shard, which dials its own connection.
#[derive(Debug, Clone)]
pub struct RedisBackend {
    inner: Arc<Settings>,
}

#[derive(Debug)]
struct Settings {
    addr: SocketAddr,
    addr_text: String,
    username: Option<String>,
    password: Option<super::Secret>,
    db: u32,
    client_name: String,
    dial_timeout: Duration,
    op_timeout: Duration,
    inflight_max: usize,
    info: ServerInfo,
    /// The seed's host: what an empty host in a cluster reply means.
    seed_host: String,
    /// The slot map read at open (cluster mode only).
    slots: Option<SlotMap>,
    /// TLS client config and the certificate name override, when TLS is on.
    tls: Option<(Arc<rustls::ClientConfig>, Option<String>)>,
}

impl Settings {
    /// The name `host`'s certificate must carry.
    fn tls_name(&self, host: &str) -> Result<rustls_pki_types::ServerName<'static>, String> {
        let name = self
            .tls
            .as_ref()
            .and_then(|(_, n)| n.clone())
            .unwrap_or_else(|| {
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned()
            });
        tls::server_name(&name)
    }
}

/// The host part of `host:port` (brackets kept off IPv6).
fn host_of(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    }
}

impl RedisBackend {
    /// What the server reported at open.
    pub fn info(&self) -> &ServerInfo {
        &self.inner.info
    }

    /// Dials shard `shard`'s connections (handshake included): one to the
    /// server, or one per master of a cluster.
    pub async fn shard(&self, shard: usize) -> Result<RedisShard, CacheError> {
        let s = &self.inner;
        let sweep_every =
            (s.op_timeout / 10).clamp(Duration::from_millis(1), Duration::from_millis(10));
        match &s.slots {
            None => {
                let (connector, config) = connector(s, &s.addr_text, Some(s.addr), shard);
                let pipeline =
                    Rc::new(Pipeline::<Resp>::connect(connector, config).await.map_err(
                        |detail| CacheError::Connect {
                            addr: s.addr_text.clone(),
                            detail,
                        },
                    )?);
                let swept = Rc::downgrade(&pipeline);
                let sweeper = glommio::spawn_local(async move {
                    loop {
                        glommio::timer::sleep(sweep_every).await;
                        let Some(p) = swept.upgrade() else { return };
                        p.sweep(Instant::now());
                    }
                });
                Ok(RedisShard {
                    mode: Mode::Standalone(pipeline),
                    sweeper: RefCell::new(Some(sweeper)),
                    settings: s.clone(),
                })
            }
            Some(map) => {
                let cluster = Rc::new(Cluster {
                    settings: s.clone(),
                    shard,
                    map: RefCell::new(map.clone()),
                    conns: RefCell::new(HashMap::new()),
                    refresh_wanted: Cell::new(false),
                    refreshing: Cell::new(false),
                    refreshed_at: Cell::new(Instant::now()),
                    retired: RefCell::new(Vec::new()),
                    dropped: Cell::new(Default::default()),
                    disconnects_seen: Cell::new(0),
                    redirects: Cell::default(),
                });
                for node in map.nodes() {
                    let p = cluster.dial_node(node).await?;
                    cluster.conns.borrow_mut().insert(node.clone(), p);
                }
                let weak = Rc::downgrade(&cluster);
                let sweeper = glommio::spawn_local(cluster_upkeep(weak, sweep_every));
                Ok(RedisShard {
                    mode: Mode::Cluster(cluster),
                    sweeper: RefCell::new(Some(sweeper)),
                    settings: s.clone(),
                })
            }
        }
    }
}

/// A connector to `addr_text` (an address, or a host name looked up on
/// every dial) for shard `shard`, and its pipeline's bounds; `known`: the
/// address it resolved to already, used should a lookup fail.
fn connector(
    s: &Arc<Settings>,
    addr_text: &str,
    known: Option<SocketAddr>,
    shard: usize,
) -> (RedisConnector, PipelineConfig) {
    (
        RedisConnector {
            settings: s.clone(),
            addr_text: addr_text.to_owned(),
            known: Arc::new(std::sync::Mutex::new(
                known.or_else(|| addr_text.parse().ok()),
            )),
            looking: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            name: format!("{}-s{shard}", s.client_name),
        },
        PipelineConfig {
            inflight_max: s.inflight_max,
            op_timeout: s.op_timeout,
            ..PipelineConfig::default()
        },
    )
}

/// One shard's view of a Redis Cluster: its own slot map (refreshed on
/// `MOVED` and on connection loss, at most every [`REFRESH_GAP`]) and one
/// pipelined connection per master. A dead master fails only its slots.
struct Cluster {
    settings: Arc<Settings>,
    shard: usize,
    map: RefCell<SlotMap>,
    conns: RefCell<HashMap<NodeAddr, Rc<Pipeline<Resp>>>>,
    refresh_wanted: Cell<bool>,
    /// A refresh task is running: at most one at a time.
    refreshing: Cell<bool>,
    refreshed_at: Cell<Instant>,
    /// Connections a new map no longer names, kept (and swept, so their
    /// calls still time out) until nothing is in flight on them.
    retired: RefCell<Vec<Rc<Pipeline<Resp>>>>,
    /// The counters of connections no longer kept, so this shard's totals
    /// never go down when the topology changes (Prometheus would read a
    /// reset, mid-incident).
    dropped: Cell<crate::pipeline::PipelineCounters>,
    disconnects_seen: Cell<u64>,
    redirects: Cell<Redirects>,
}

/// Cluster redirects followed by one shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Redirects {
    pub moved: u64,
    pub ask: u64,
    pub refreshes: u64,
}

impl Cluster {
    /// Dials `node` and waits for the connection (a shard's start).
    async fn dial_node(&self, node: &NodeAddr) -> Result<Rc<Pipeline<Resp>>, CacheError> {
        let (connector, config) =
            connector(&self.settings, &node.socket_addr_string(), None, self.shard);
        Pipeline::<Resp>::connect(connector, config)
            .await
            .map(Rc::new)
            .map_err(|detail| CacheError::Connect {
                addr: node.socket_addr_string(),
                detail,
            })
    }

    /// The connection to `node`. A node new to this shard gets one that
    /// dials in the background (a dial may take the dial timeout, a host
    /// name longer to resolve): calls to it fail fast until it is up, as
    /// calls to any connection that is down do, so no claim waits on a dial.
    fn conn(&self, node: &NodeAddr) -> Rc<Pipeline<Resp>> {
        if let Some(p) = self.conns.borrow().get(node) {
            return p.clone();
        }
        let (connector, config) =
            connector(&self.settings, &node.socket_addr_string(), None, self.shard);
        let p = Rc::new(Pipeline::<Resp>::connect_later(connector, config));
        self.conns.borrow_mut().insert(node.clone(), p.clone());
        p
    }

    /// The master the map names for `key`'s slot.
    fn master_of(&self, key: &[u8]) -> Option<NodeAddr> {
        let map = self.map.borrow();
        map.node_for_slot(hash_slot(key))
            .and_then(|i| map.node(i).cloned())
    }

    /// Sends a single-key command to its slot's master, following one
    /// `MOVED` (map patched, refresh requested) or one `ASK` (`ASKING` then
    /// the command, same connection, adjacent in its pipeline).
    async fn exec(
        &self,
        deadline: Instant,
        key: &[u8],
        encode: impl Fn(&mut Vec<u8>),
    ) -> Result<Reply, CallError> {
        let Some(node) = self.master_of(key) else {
            self.refresh_wanted.set(true);
            return Err(CallError::Disconnected);
        };
        let reply = self.conn(&node).call_by(deadline, &encode).await?;
        let Reply::Error(err) = &reply else {
            return Ok(reply);
        };
        match parse_redirect(err, &self.settings.seed_host) {
            None => Ok(reply),
            Some(Redirect::Moved { slot, addr }) => {
                self.count(|r| r.moved += 1);
                self.map.borrow_mut().assign(slot, &addr);
                self.refresh_wanted.set(true);
                self.conn(&addr).call_by(deadline, &encode).await
            }
            Some(Redirect::Ask { addr, .. }) => {
                self.count(|r| r.ask += 1);
                let p = self.conn(&addr);
                let asking = p.call_by(deadline, |b| encode_command(b, &[b"ASKING"]));
                let (_, reply) =
                    futures_lite::future::zip(asking, p.call_by(deadline, &encode)).await;
                reply
            }
        }
    }

    fn count(&self, f: impl FnOnce(&mut Redirects)) {
        let mut r = self.redirects.get();
        f(&mut r);
        self.redirects.set(r);
    }

    /// Times out every connection's overdue calls (retired ones included)
    /// and says whether a master's connection is down now.
    fn sweep(&self, now: Instant) -> bool {
        let mut disconnects = 0;
        let mut down = false;
        for p in self.conns.borrow().values() {
            p.sweep(now);
            disconnects += p.counters().disconnects;
            down |= !p.is_up();
        }
        if disconnects != self.disconnects_seen.get() {
            self.disconnects_seen.set(disconnects);
            self.refresh_wanted.set(true);
        }
        self.retired.borrow_mut().retain(|p| {
            p.sweep(now);
            let keep = p.inflight() > 0;
            if !keep {
                self.drop_counters(p);
            }
            keep
        });
        down
    }

    /// Keeps what a connection about to be dropped counted.
    fn drop_counters(&self, p: &Pipeline<Resp>) {
        let mut d = self.dropped.get();
        d.add(&p.counters());
        self.dropped.set(d);
    }

    /// Reads `CLUSTER SLOTS` from any live master and swaps the map in.
    async fn refresh(&self) {
        self.count(|r| r.refreshes += 1);
        self.refresh_wanted.set(false);
        self.refreshed_at.set(Instant::now());
        let live: Vec<_> = self
            .conns
            .borrow()
            .values()
            .filter(|p| p.is_up())
            .cloned()
            .collect();
        for p in live {
            let Ok(mut reply) = self.map_call(&p, b"SLOTS").await else {
                continue;
            };
            let seed = &self.settings.seed_host;
            if matches!(reply, Reply::Error(_)) {
                // A server without the deprecated command: ask CLUSTER SHARDS.
                let Ok(shards) = self.map_call(&p, b"SHARDS").await else {
                    continue;
                };
                reply = shards;
                match parse_cluster_shards(&reply, seed) {
                    Ok(map) => {
                        self.swap_map(map);
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "bad CLUSTER SHARDS reply");
                        continue;
                    }
                }
            }
            match parse_cluster_slots(&reply, seed) {
                Ok(map) => {
                    self.swap_map(map);
                    return;
                }
                Err(e) => tracing::debug!(error = %e, "bad CLUSTER SLOTS reply"),
            }
        }
        // Nothing answered: try again after the gap.
        self.refresh_wanted.set(true);
    }

    /// `CLUSTER <what>` on `p`, given up after the op timeout by itself:
    /// the refresh must end even if the shard's sweep has stopped (the
    /// shard is being dropped), and a stuck master must not hold it.
    async fn map_call(&self, p: &Pipeline<Resp>, what: &[u8]) -> Result<Reply, CallError> {
        use futures_lite::FutureExt;
        let limit = self.settings.op_timeout;
        p.call(|b| encode_command(b, &[b"CLUSTER", what]))
            .or(async {
                glommio::timer::sleep(limit).await;
                Err(CallError::Timeout(limit))
            })
            .await
    }

    fn swap_map(&self, map: SlotMap) {
        let keep: Vec<NodeAddr> = map.nodes().to_vec();
        *self.map.borrow_mut() = map;
        // Retire connections to nodes that serve nothing now; calls still on
        // them keep being swept until they end.
        let mut retired = self.retired.borrow_mut();
        self.conns.borrow_mut().retain(|n, p| {
            let kept = keep.contains(n);
            if !kept && p.inflight() > 0 {
                retired.push(p.clone());
            } else if !kept {
                self.drop_counters(p);
            }
            kept
        });
        drop(retired);
        // Masters new to this shard start dialing now, before claims need
        // them (a promoted replica, a node added by resharding).
        for node in &keep {
            self.conn(node);
        }
    }
}

/// Per shard: the op-timeout sweep of every connection and, when wanted,
/// a slot-map refresh (cold path, rate-limited). The refresh runs as its own
/// task: its calls time out only through this sweep, so the sweep must never
/// wait on them (a master that stops answering would stop every timeout).
async fn cluster_upkeep(weak: Weak<Cluster>, every: Duration) {
    loop {
        glommio::timer::sleep(every).await;
        let Some(c) = weak.upgrade() else { return };
        let now = Instant::now();
        let down = c.sweep(now);
        let since = now.duration_since(c.refreshed_at.get());
        let due = (c.refresh_wanted.get() && since >= REFRESH_GAP)
            || (down && since >= DOWN_REFRESH_EVERY);
        if due && !c.refreshing.get() {
            c.refreshing.set(true);
            let weak = weak.clone();
            glommio::spawn_local(async move {
                if let Some(c) = weak.upgrade() {
                    c.refresh().await;
                    c.refreshing.set(false);
                }
            })
            .detach();
        }
    }
}

struct RedisConnector {
    settings: Arc<Settings>,
    addr_text: String,
    /// The address the last lookup found (or the one given).
    known: Arc<std::sync::Mutex<Option<SocketAddr>>>,
    /// A lookup is running (one at a time, however slow the resolver).
    looking: Arc<std::sync::atomic::AtomicBool>,
    name: String,
}

impl RedisConnector {
    /// Where to dial now: a host name is looked up again on every dial (on
    /// a thread of its own, one lookup at a time, so a slow resolver holds
    /// neither the shard nor later dials), since a managed endpoint fails
    /// over by moving its name to another address. A dial waits for the
    /// lookup at most half the dial timeout, then uses the last address
    /// known; a lookup that answers later still updates it for the next.
    async fn resolve(&self) -> Result<SocketAddr, String> {
        use std::sync::atomic::Ordering as AtomicOrdering;
        if let Ok(a) = self.addr_text.parse::<SocketAddr>() {
            return Ok(a);
        }
        if !self.looking.swap(true, AtomicOrdering::AcqRel) {
            let (name, known, looking) = (
                self.addr_text.clone(),
                self.known.clone(),
                self.looking.clone(),
            );
            let (tx, rx) = flume::bounded(1);
            let spawned = std::thread::Builder::new()
                .name("txgate-resolve".into())
                .spawn(move || {
                    let found = name.to_socket_addrs().ok().and_then(|mut a| a.next());
                    if found.is_some() {
                        *known.lock().unwrap_or_else(|p| p.into_inner()) = found;
                    }
                    looking.store(false, AtomicOrdering::Release);
                    let _ = tx.send(());
                });
            if spawned.is_err() {
                self.looking.store(false, AtomicOrdering::Release);
            } else {
                let wait = async {
                    let _ = rx.recv_async().await;
                    Ok(())
                };
                let _ = glommio::timer::timeout(self.settings.dial_timeout / 2, wait).await;
            }
        }
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(|| format!("cannot resolve {}", self.addr_text))
    }
}

impl Connector for RedisConnector {
    type Stream = tls::RedisStream;

    fn peer(&self) -> String {
        format!("redis {}", self.addr_text)
    }

    async fn connect(&self) -> Result<tls::RedisStream, String> {
        let s = &self.settings;
        let deadline = s.dial_timeout;
        let work = async {
            let addr = self.resolve().await?;
            let tcp = TcpStream::connect_timeout(addr, deadline)
                .await
                .map_err(|e| format!("dialing {} ({addr}): {e}", self.addr_text))?;
            tcp.set_nodelay(true)
                .map_err(|e| format!("TCP_NODELAY: {e}"))?;
            let mut stream = match &s.tls {
                None => tls::RedisStream::Plain(tcp),
                Some((config, _)) => {
                    let name = s.tls_name(host_of(&self.addr_text))?;
                    let tls = futures_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| format!("TLS handshake with {}: {e}", self.addr_text))?;
                    tls::RedisStream::Tls(Box::new(tls))
                }
            };
            for cmd in handshake_commands(s, Some(&self.name)) {
                let args: Vec<&[u8]> = cmd.iter().map(|a| a.as_slice()).collect();
                let reply = roundtrip_async(&mut stream, &args).await?;
                check_handshake_reply(&cmd, &reply)?;
            }
            Ok::<_, String>(stream)
        };
        match glommio::timer::timeout(deadline, async { Ok(work.await) }).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no connection to {} within {} ms",
                self.addr_text,
                deadline.as_millis()
            )),
        }
    }
}

/// Why Redis would refuse `name` for `CLIENT SETNAME` (it takes printable
/// ASCII without spaces), checked where flags are read rather than failing
/// every shard's dial; `None` when it is fine.
pub fn client_name_problem(name: &str) -> Option<String> {
    name.bytes().find(|b| !(b'!'..=b'~').contains(b)).map(|b| {
        format!("'{name}' holds {b:#04x}: a client name takes printable ASCII without spaces")
    })
}

/// `txgate-{instance_id}` with every byte Redis refuses in a client name
/// made `_`.
pub fn client_name_for(instance_id: &str) -> String {
    let id: String = instance_id
        .chars()
        .map(|c| if ('!'..='~').contains(&c) { c } else { '_' })
        .collect();
    format!("txgate-{id}")
}

/// AUTH, SELECT and CLIENT SETNAME as the settings require.
fn handshake_commands(s: &Settings, name: Option<&str>) -> Vec<Vec<Vec<u8>>> {
    let mut cmds = Vec::new();
    match (&s.username, &s.password) {
        (Some(u), Some(p)) => cmds.push(vec![
            b"AUTH".to_vec(),
            u.clone().into_bytes(),
            p.expose().as_bytes().to_vec(),
        ]),
        (None, Some(p)) => cmds.push(vec![b"AUTH".to_vec(), p.expose().as_bytes().to_vec()]),
        _ => {}
    }
    if s.db != 0 && !s.info.cluster {
        cmds.push(vec![b"SELECT".to_vec(), s.db.to_string().into_bytes()]);
    }
    if let Some(n) = name {
        cmds.push(vec![
            b"CLIENT".to_vec(),
            b"SETNAME".to_vec(),
            n.as_bytes().to_vec(),
        ]);
    }
    cmds
}

fn check_handshake_reply(cmd: &[Vec<u8>], reply: &Reply) -> Result<(), String> {
    match reply {
        Reply::Error(e) => Err(format!("{} refused: {e}", String::from_utf8_lossy(&cmd[0]))),
        _ => Ok(()),
    }
}

async fn roundtrip_async(stream: &mut tls::RedisStream, args: &[&[u8]]) -> Result<Reply, String> {
    use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    encode_command(&mut buf, args);
    stream
        .write_all(&buf)
        .await
        .map_err(|e| format!("write: {e}"))?;
    stream.flush().await.map_err(|e| format!("write: {e}"))?;
    let mut rbuf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    // Handshake replies are small; the bound guards against a peer that
    // streams bytes without ever completing a reply.
    while rbuf.len() < 1 << 20 {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed during the handshake".into());
        }
        rbuf.extend_from_slice(&chunk[..n]);
        match decode_reply(&rbuf) {
            Ok(Some((r, _))) => return Ok(r),
            Ok(None) => continue,
            Err(e) => return Err(format!("not a Redis-protocol reply: {e}")),
        }
    }
    Err("handshake reply too large".into())
}

/// One shard's Redis backend.
pub struct RedisShard {
    mode: Mode,
    /// The op-timeout sweep (in cluster mode also the map's upkeep, which
    /// dials nodes): taken, and so cancelled, by `close`, or a closed shard
    /// still held by claims finishing on it would keep ticking.
    sweeper: RefCell<Option<glommio::Task<()>>>,
    settings: Arc<Settings>,
}

enum Mode {
    Standalone(Rc<Pipeline<Resp>>),
    Cluster(Rc<Cluster>),
}

/// `PX` milliseconds, rounded up (a TTL never ends early); `None` for no
/// expiry. On the stack: this runs on every claim.
fn px(ttl: Duration) -> Option<Px> {
    if ttl.is_zero() {
        return None;
    }
    // In u64 (a u128 division and format cost more, on every claim).
    let ms = ttl
        .as_secs()
        .saturating_mul(1000)
        .saturating_add(u64::from(ttl.subsec_nanos().div_ceil(1_000_000)))
        .max(1);
    let mut px = Px {
        buf: [0; 40],
        len: 0,
    };
    let mut num = itoa::Buffer::new();
    let text = num.format(ms).as_bytes();
    px.buf[..text.len()].copy_from_slice(text);
    px.len = text.len();
    Some(px)
}

#[derive(Debug)]
struct Px {
    buf: [u8; 40],
    len: usize,
}

impl std::ops::Deref for Px {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn unexpected(op: &'static str, r: Reply) -> CacheError {
    match r {
        Reply::Error(e) => CacheError::Backend { op, detail: e },
        other => CacheError::Backend {
            op,
            detail: format!("unexpected reply {other:?}"),
        },
    }
}

/// `SET … NX` reply: `+OK` created, nil already there.
fn nx_outcome(reply: Reply) -> Result<bool, CacheError> {
    match reply {
        Reply::Ok => Ok(true),
        Reply::Nil => Ok(false),
        other => Err(unexpected("set_nx", other)),
    }
}

/// `SET … NX … GET` reply after an ambiguous first attempt: nil means the
/// key was absent and is ours now; our own (per-claim unique) value means
/// the first attempt created it; any other value is a rival's.
fn nx_get_outcome(reply: Reply, ours: &[u8]) -> Result<bool, CacheError> {
    match reply {
        Reply::Nil => Ok(true),
        Reply::Bulk(v) => Ok(v == ours),
        other => Err(unexpected("set_nx", other)),
    }
}

impl RedisShard {
    async fn set_cmd(
        &self,
        deadline: Instant,
        key: &[u8],
        val: &[u8],
        ttl: Duration,
        nx: bool,
        get: bool,
    ) -> Result<Reply, CallError> {
        let px = px(ttl);
        self.exec(deadline, key, |b| {
            let mut args: [&[u8]; 7] = [b"SET", key, val, b"", b"", b"", b""];
            let mut n = 3;
            if nx {
                args[n] = b"NX";
                n += 1;
            }
            if let Some(ms) = &px {
                args[n] = b"PX";
                args[n + 1] = ms;
                n += 2;
            }
            if get {
                args[n] = b"GET";
                n += 1;
            }
            encode_command(b, &args[..n]);
        })
        .await
    }

    /// Sends a single-key command where `key` lives, answered by
    /// `deadline` (redirects followed included).
    async fn exec(
        &self,
        deadline: Instant,
        key: &[u8],
        encode: impl Fn(&mut Vec<u8>),
    ) -> Result<Reply, CallError> {
        match &self.mode {
            Mode::Standalone(p) => p.call_by(deadline, encode).await,
            Mode::Cluster(c) => c.exec(deadline, key, encode).await,
        }
    }

    /// When an op starting now must be answered.
    fn deadline(&self) -> Instant {
        Instant::now() + self.settings.op_timeout
    }

    /// Waits (polling every millisecond, until `deadline`) for the
    /// connection `key` goes to to be up. A cold path: only the retry of an
    /// ambiguous claim waits here.
    async fn wait_up(&self, key: &[u8], deadline: Instant) {
        while self.fails_now(key).is_some() && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Whether a connection of this shard is down (so some calls would fail
    /// at once): a cheap check before [`RedisShard::fails_now`].
    pub fn any_down(&self) -> bool {
        match &self.mode {
            Mode::Standalone(p) => !p.is_up(),
            Mode::Cluster(c) => c.conns.borrow().values().any(|p| !p.is_up()),
        }
    }

    /// The error a call for `key` would fail with at once (its connection is
    /// down or its slot unmapped), without queuing it; `None`: it would be
    /// sent.
    pub fn fails_now(&self, key: &[u8]) -> Option<CacheError> {
        let up = match &self.mode {
            Mode::Standalone(p) => p.is_up(),
            Mode::Cluster(c) => {
                match c.master_of(key) {
                    // Dialing it if it is new, as a call would.
                    Some(node) => c.conn(&node).is_up(),
                    None => {
                        c.refresh_wanted.set(true);
                        false
                    }
                }
            }
        };
        (!up).then(|| {
            CacheError::from_call("set_nx", CallError::Disconnected, self.settings.op_timeout)
        })
    }

    /// `SET k v NX [PX ms]`; after an ambiguous failure, one `… NX … GET`
    /// retry where the server supports it and time is left: the retry
    /// shares the op's deadline, so no claim waits past the op timeout (one
    /// that timed out has none left).
    pub async fn set_nx(&self, key: &[u8], val: &[u8], ttl: Duration) -> Result<bool, CacheError> {
        let timeout = self.settings.op_timeout;
        let deadline = self.deadline();
        let first = self.set_cmd(deadline, key, val, ttl, true, false).await;
        if let Err(e) = &first
            && e.is_ambiguous()
            && self.settings.info.nx_get
            && Instant::now() < deadline
        {
            // A lost connection redials within milliseconds: wait for it
            // (boundedly) rather than fail at once on the one that is down.
            self.wait_up(key, deadline).await;
            if Instant::now() >= deadline {
                return Err(CacheError::from_call("set_nx", e.clone(), timeout));
            }
            let retry = self.set_cmd(deadline, key, val, ttl, true, true).await;
            return match retry {
                Ok(reply) => nx_get_outcome(reply, val),
                Err(e) => Err(CacheError::from_call("set_nx", e, timeout)),
            };
        }
        match first {
            Ok(reply) => nx_outcome(reply),
            Err(e) => Err(CacheError::from_call("set_nx", e, timeout)),
        }
    }

    /// `SET k v [PX ms]`.
    pub async fn set(&self, key: &[u8], val: &[u8], ttl: Duration) -> Result<(), CacheError> {
        match self
            .set_cmd(self.deadline(), key, val, ttl, false, false)
            .await
        {
            Ok(Reply::Ok) => Ok(()),
            Ok(other) => Err(unexpected("set", other)),
            Err(e) => Err(CacheError::from_call("set", e, self.settings.op_timeout)),
        }
    }

    /// `GET k`: `None` on a miss.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CacheError> {
        match self
            .exec(self.deadline(), key, |b| encode_command(b, &[b"GET", key]))
            .await
        {
            Ok(Reply::Bulk(v)) => Ok(Some(v)),
            Ok(Reply::Nil) => Ok(None),
            Ok(other) => Err(unexpected("get", other)),
            Err(e) => Err(CacheError::from_call("get", e, self.settings.op_timeout)),
        }
    }

    /// `DEL k`: 0 or 1 removed, both fine.
    pub async fn del(&self, key: &[u8]) -> Result<(), CacheError> {
        match self
            .exec(self.deadline(), key, |b| encode_command(b, &[b"DEL", key]))
            .await
        {
            Ok(Reply::Int(_)) => Ok(()),
            Ok(other) => Err(unexpected("del", other)),
            Err(e) => Err(CacheError::from_call("del", e, self.settings.op_timeout)),
        }
    }

    /// `PING` to every connection within the dial timeout; cold path.
    pub async fn healthy(&self) -> bool {
        // A cluster is healthy when every master its map names answers:
        // one that cannot be reached fails its slots' claims open.
        let probed = match &self.mode {
            Mode::Standalone(p) => vec![p.clone()],
            Mode::Cluster(c) => {
                let masters: Vec<NodeAddr> = c.map.borrow().nodes().to_vec();
                masters.iter().map(|n| c.conn(n)).collect()
            }
        };
        for p in probed {
            let ping = p.call(|b| encode_command(b, &[b"PING"]));
            let bounded =
                glommio::timer::timeout(self.settings.dial_timeout, async { Ok(ping.await) });
            if !matches!(bounded.await, Ok(Ok(Reply::Simple(_)))) {
                return false;
            }
        }
        true
    }

    /// Every connection this shard holds, retired ones included.
    fn pipelines(&self) -> Vec<Rc<Pipeline<Resp>>> {
        match &self.mode {
            Mode::Standalone(p) => vec![p.clone()],
            Mode::Cluster(c) => {
                let mut all: Vec<_> = c.conns.borrow().values().cloned().collect();
                all.extend(c.retired.borrow().iter().cloned());
                all
            }
        }
    }

    /// Cluster redirects this shard followed (zeros when standalone).
    pub fn redirects(&self) -> Redirects {
        match &self.mode {
            Mode::Standalone(_) => Redirects::default(),
            Mode::Cluster(c) => c.redirects.get(),
        }
    }

    /// Counters summed over this shard's connections, those it no longer
    /// holds included: they only ever grow.
    pub fn counters(&self) -> crate::pipeline::PipelineCounters {
        let mut t = match &self.mode {
            Mode::Standalone(_) => Default::default(),
            Mode::Cluster(c) => c.dropped.get(),
        };
        for p in self.pipelines() {
            t.add(&p.counters());
        }
        t
    }

    /// (up now, all) of the shard's connections, one per node it routes to
    /// (a cluster's retired ones, only draining, are not counted).
    pub fn connections_up(&self) -> (u64, u64) {
        let up_of = |ps: &mut dyn Iterator<Item = &Rc<Pipeline<Resp>>>| {
            ps.fold((0, 0), |(up, all), p| (up + u64::from(p.is_up()), all + 1))
        };
        match &self.mode {
            Mode::Standalone(p) => up_of(&mut std::iter::once(p)),
            Mode::Cluster(c) => up_of(&mut c.conns.borrow().values()),
        }
    }

    /// Fails everything in flight and stops reconnecting and sweeping.
    pub fn close(&self) {
        drop(self.sweeper.borrow_mut().take());
        for p in self.pipelines() {
            p.close();
        }
    }
}

/// Resolves `config.redis_addr`, then dials and verifies it with blocking
/// I/O (a cold path, before any shard starts), all within the dial timeout:
/// PING, AUTH, INFO server (version), INFO cluster.
pub fn open(config: &Config) -> Result<RedisBackend, CacheError> {
    let addr_text = config
        .redis_addr
        .clone()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| CacheError::Config("redis needs an address".into()))?;
    let addr = resolve_within(&addr_text, config.dial_timeout)?;
    let tls = if config.redis_tls {
        let host = host_of(&addr_text)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let seed_name = host.parse::<std::net::IpAddr>().is_err().then_some(host);
        let c = tls::client_config(
            config.redis_tls_ca_file.as_deref(),
            config.redis_tls_cert_file.as_deref(),
            config.redis_tls_key_file.as_deref(),
            seed_name,
        )
        .map_err(CacheError::Config)?;
        Some((c, config.redis_tls_server_name.clone()))
    } else {
        None
    };
    let mut settings = Settings {
        seed_host: addr.ip().to_string(),
        slots: None,
        tls,
        addr,
        addr_text: addr_text.clone(),
        username: config.redis_username.clone(),
        password: config.redis_password.clone(),
        db: config.redis_db,
        client_name: config.redis_client_name.clone(),
        dial_timeout: config.dial_timeout,
        op_timeout: config.op_timeout,
        inflight_max: config.redis_inflight_max.max(1),
        info: ServerInfo {
            version: (0, 0, 0),
            nx_get: false,
            cluster: false,
        },
    };
    let (info, slots) = verify(&settings)?;
    settings.info = info;
    settings.slots = slots;
    Ok(RedisBackend {
        inner: Arc::new(settings),
    })
}

/// `addr_text`'s first address, looked up within `timeout` (a resolver
/// that does not answer must not hold `open` past the dial timeout; its
/// thread ends when the resolver gives up).
fn resolve_within(addr_text: &str, timeout: Duration) -> Result<SocketAddr, CacheError> {
    if let Ok(a) = addr_text.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let name = addr_text.to_owned();
    std::thread::Builder::new()
        .name("txgate-resolve".into())
        .spawn(move || {
            let _ = tx.send(name.to_socket_addrs().map(|mut a| a.next()));
        })
        .map_err(|e| CacheError::Connect {
            addr: addr_text.to_owned(),
            detail: format!("no thread to resolve it: {e}"),
        })?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(Some(a))) => Ok(a),
        Ok(Ok(None)) => Err(CacheError::Connect {
            addr: addr_text.to_owned(),
            detail: "resolves to no address".into(),
        }),
        Ok(Err(e)) => Err(CacheError::Connect {
            addr: addr_text.to_owned(),
            detail: format!("cannot resolve: {e}"),
        }),
        Err(_) => Err(CacheError::DialTimeout {
            addr: addr_text.to_owned(),
            after_ms: timeout.as_millis() as u64,
        }),
    }
}

/// The blocking stream `open` verifies over, plain or TLS.
enum VerifyStream {
    Plain(StdTcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Deadlined>>),
}

impl VerifyStream {
    fn tcp(&self) -> &StdTcpStream {
        match self {
            Self::Plain(t) => t,
            Self::Tls(t) => &t.sock.tcp,
        }
    }
}

/// A TCP stream each of whose reads and writes waits at most until
/// `deadline`. rustls reads in loops of its own (the handshake, a record
/// arriving in pieces), which a timeout set once per round trip would not
/// bound: a peer trickling a record could hold `open` for ever.
struct Deadlined {
    tcp: StdTcpStream,
    deadline: Instant,
}

impl Deadlined {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.tcp.set_read_timeout(Some(self.left()?))?;
        self.tcp.read(buf)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.set_write_timeout(Some(self.left()?))?;
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

impl Read for VerifyStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(t) => t.read(buf),
            Self::Tls(t) => t.read(buf),
        }
    }
}

impl Write for VerifyStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(t) => t.write(buf),
            Self::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(t) => t.flush(),
            Self::Tls(t) => t.flush(),
        }
    }
}

/// What `open` learned of the server's version and mode, from whichever
/// command the server answered; `None`: not learned yet.
#[derive(Debug, Default, PartialEq, Eq)]
struct ServerProbe {
    version: Option<(u32, u32, u32)>,
    cluster: Option<bool>,
    /// The errors of the commands refused, for the message when nothing
    /// answered.
    refusals: Vec<String>,
}

impl ServerProbe {
    /// The replies to `INFO server` and `INFO cluster`.
    fn read_info(&mut self, server: &Reply, cluster: &Reply) {
        match server {
            Reply::Bulk(text) => {
                self.version = info_field(text, "redis_version").and_then(parse_version);
            }
            Reply::Error(e) => self.refusals.push(format!("INFO: {e}")),
            _ => {}
        }
        match cluster {
            Reply::Bulk(text) => {
                self.cluster = info_field(text, "cluster_enabled").map(|v| v == "1");
            }
            Reply::Error(e) if !matches!(server, Reply::Error(_)) => {
                self.refusals.push(format!("INFO cluster: {e}"));
            }
            _ => {}
        }
    }

    /// The reply to `HELLO` (RESP2: field names and values alternating).
    fn read_hello(&mut self, reply: &Reply) {
        let items = match reply {
            Reply::Array(items) => items,
            Reply::Error(e) => {
                self.refusals.push(format!("HELLO: {e}"));
                return;
            }
            _ => return,
        };
        let text = |r: &Reply| match r {
            Reply::Bulk(b) | Reply::Simple(b) => std::str::from_utf8(b).ok().map(str::to_owned),
            _ => None,
        };
        for pair in items.chunks_exact(2) {
            match text(&pair[0]).as_deref() {
                Some("version") if self.version.is_none() => {
                    self.version = text(&pair[1]).as_deref().and_then(parse_version);
                }
                Some("mode") if self.cluster.is_none() => {
                    self.cluster = text(&pair[1]).map(|m| m == "cluster");
                }
                _ => {}
            }
        }
    }
}

fn verify(s: &Settings) -> Result<(ServerInfo, Option<SlotMap>), CacheError> {
    let addr = s.addr_text.clone();
    let deadline = Instant::now() + s.dial_timeout;
    let timed_out = || CacheError::DialTimeout {
        addr: addr.clone(),
        after_ms: s.dial_timeout.as_millis() as u64,
    };
    let tcp =
        StdTcpStream::connect_timeout(&s.addr, s.dial_timeout).map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => CacheError::Refused { addr: addr.clone() },
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => timed_out(),
            _ => CacheError::Connect {
                addr: addr.clone(),
                detail: e.to_string(),
            },
        })?;
    let mut stream = match &s.tls {
        None => VerifyStream::Plain(tcp),
        Some((config, _)) => {
            let name = s.tls_name(host_of(&addr)).map_err(CacheError::Config)?;
            let conn = rustls::ClientConnection::new(config.clone(), name).map_err(|e| {
                CacheError::Connect {
                    addr: addr.clone(),
                    detail: format!("TLS: {e}"),
                }
            })?;
            VerifyStream::Tls(Box::new(rustls::StreamOwned::new(
                conn,
                Deadlined { tcp, deadline },
            )))
        }
    };
    let mut ask = |args: &[&[u8]]| -> Result<Reply, CacheError> {
        use super::blocking::{RoundTripError, round_trip};
        let mut buf = Vec::new();
        encode_command(&mut buf, args);
        let set_timeout = |s: &VerifyStream, left: Duration| {
            s.tcp().set_read_timeout(Some(left))?;
            s.tcp().set_write_timeout(Some(left))
        };
        round_trip(
            &mut stream,
            set_timeout,
            &buf,
            deadline,
            4 << 20,
            decode_reply,
        )
        .map_err(|e| match e {
            RoundTripError::Timeout => timed_out(),
            RoundTripError::Io(e) => CacheError::Connect {
                addr: addr.clone(),
                detail: e.to_string(),
            },
            RoundTripError::Closed => CacheError::Connect {
                addr: addr.clone(),
                detail: "closed the connection".into(),
            },
            RoundTripError::Decode(_, got) => CacheError::NotRedis {
                addr: addr.clone(),
                got: String::from_utf8_lossy(&got).into_owned(),
            },
            RoundTripError::TooLarge => CacheError::NotRedis {
                addr: addr.clone(),
                got: "an endless reply".into(),
            },
        })
    };
    for cmd in handshake_commands(s, None) {
        let args: Vec<&[u8]> = cmd.iter().map(|a| a.as_slice()).collect();
        match ask(&args)? {
            // A server that wants a password answers NOAUTH to SELECT,
            // which goes before PING: that too is an auth failure.
            Reply::Error(e)
                if cmd[0] == b"AUTH" || e.starts_with("NOAUTH") || e.starts_with("WRONGPASS") =>
            {
                return Err(CacheError::Auth {
                    addr: addr.clone(),
                    detail: e,
                });
            }
            Reply::Error(e) => {
                let detail = format!("{} refused: {e}", String::from_utf8_lossy(&cmd[0]));
                return Err(if is_transient(&e) {
                    CacheError::Connect {
                        addr: addr.clone(),
                        detail,
                    }
                } else {
                    // SELECT out of range, CLIENT SETNAME denied by an ACL:
                    // our settings, which waiting does not fix.
                    CacheError::Config(format!("{addr}: {detail}"))
                });
            }
            _ => {}
        }
    }
    match ask(&[b"PING"])? {
        Reply::Simple(p) if p == b"PONG" => {}
        Reply::Error(e) if e.starts_with("NOAUTH") || e.starts_with("WRONGPASS") => {
            return Err(CacheError::Auth {
                addr: addr.clone(),
                detail: e,
            });
        }
        Reply::Error(e) if is_transient(&e) => {
            return Err(CacheError::Connect {
                addr: addr.clone(),
                detail: format!("not ready: {e} to PING"),
            });
        }
        other => {
            return Err(CacheError::NotRedis {
                addr: addr.clone(),
                got: format!("{other:?} to PING"),
            });
        }
    }
    // What the server is. INFO may be refused (an ACL user without `+info`,
    // or the command renamed away): then HELLO (Redis ≥ 6.0, in
    // `@connection`) names version and mode, and failing that, whether
    // CLUSTER SLOTS works. Guessing "standalone" would send two thirds of a
    // cluster's claims to the wrong node, each failing open with MOVED.
    let mut probe = ServerProbe::default();
    probe.read_info(&ask(&[b"INFO", b"server"])?, &ask(&[b"INFO", b"cluster"])?);
    if probe.version.is_none() || probe.cluster.is_none() {
        probe.read_hello(&ask(&[b"HELLO"])?);
    }
    let mut slots = None;
    if probe.cluster.is_none() {
        let reply = ask(&[b"CLUSTER", b"SLOTS"])?;
        match &reply {
            Reply::Array(_) => probe.cluster = Some(true),
            Reply::Error(e) if e.contains("cluster support disabled") => {
                probe.cluster = Some(false)
            }
            Reply::Error(e) => probe.refusals.push(format!("CLUSTER SLOTS: {e}")),
            _ => {}
        }
        slots = Some(reply);
    }
    let Some(cluster) = probe.cluster else {
        return Err(CacheError::Connect {
            addr: addr.clone(),
            detail: format!(
                "cannot tell whether it is a cluster node: INFO, HELLO and CLUSTER SLOTS were \
                 all refused ({}); grant the user one of +info, +hello or +cluster|slots",
                probe.refusals.join("; ")
            ),
        });
    };
    let version = probe.version.unwrap_or((0, 0, 0));
    if probe.version.is_none() {
        tracing::warn!(
            addr = %addr,
            "the server's version is unknown (INFO and HELLO refused): SET NX GET, and with it \
             the one safe retry of an ambiguous claim, stays off"
        );
    }
    let info = ServerInfo {
        version,
        nx_get: version >= (7, 0, 0),
        cluster,
    };
    if !info.cluster {
        return Ok((info, None));
    }
    if s.db != 0 {
        return Err(CacheError::Config(format!(
            "{addr} is a Redis Cluster node: SELECT {} is not available (cluster mode has database 0 only)",
            s.db
        )));
    }
    let slots = match slots {
        Some(reply) => reply,
        None => ask(&[b"CLUSTER", b"SLOTS"])?,
    };
    let map = match slots {
        // A server without the deprecated command: CLUSTER SHARDS (≥ 7.0).
        Reply::Error(_) => parse_cluster_shards(&ask(&[b"CLUSTER", b"SHARDS"])?, &s.seed_host),
        reply => parse_cluster_slots(&reply, &s.seed_host),
    }
    .map_err(|e| CacheError::Connect {
        addr: addr.clone(),
        detail: format!("reading the cluster's slot map: {e}"),
    })?;
    if map.nodes().is_empty() {
        return Err(CacheError::Connect {
            addr: addr.clone(),
            detail: "the cluster serves no slots yet".into(),
        });
    }
    Ok((info, Some(map)))
}

/// An error reply a server gives while it cannot serve yet (loading its
/// data, its master down, a script running, a slot moving): an outage that
/// passes, not a refusal of our settings.
fn is_transient(e: &str) -> bool {
    ["LOADING", "MASTERDOWN", "BUSY", "TRYAGAIN", "CLUSTERDOWN"]
        .iter()
        .any(|p| e.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_nx_replies_decide_won_or_lost() {
        assert_eq!(nx_outcome(Reply::Ok), Ok(true));
        assert_eq!(nx_outcome(Reply::Nil), Ok(false));
        assert!(nx_outcome(Reply::Error("WRONGTYPE".into())).is_err());
    }

    #[test]
    fn nx_get_retry_tells_our_first_write_from_a_rivals() {
        let ours = b"host-1:0:42";
        assert_eq!(
            nx_get_outcome(Reply::Nil, ours),
            Ok(true),
            "absent: created now"
        );
        assert_eq!(
            nx_get_outcome(Reply::Bulk(ours.to_vec()), ours),
            Ok(true),
            "our first attempt won"
        );
        assert_eq!(
            nx_get_outcome(Reply::Bulk(b"host-2:1:7".to_vec()), ours),
            Ok(false),
            "a rival won"
        );
        assert!(nx_get_outcome(Reply::Ok, ours).is_err());
    }

    #[test]
    fn px_rounds_up_to_whole_milliseconds_and_zero_means_no_expiry() {
        assert!(px(Duration::ZERO).is_none());
        assert_eq!(px(Duration::from_micros(1)).as_deref(), Some(&b"1"[..]));
        assert_eq!(px(Duration::from_micros(1500)).as_deref(), Some(&b"2"[..]));
        assert_eq!(px(Duration::from_secs(60)).as_deref(), Some(&b"60000"[..]));
        assert_eq!(
            px(Duration::from_millis(2_999) + Duration::from_nanos(1)).as_deref(),
            Some(&b"3000"[..])
        );
        assert_eq!(
            px(Duration::MAX).as_deref(),
            Some(u64::MAX.to_string().as_bytes())
        );
    }
}
