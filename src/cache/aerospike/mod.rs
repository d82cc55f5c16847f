//! The Aerospike backend (Community Edition), spoken by hand over glommio.
//!
//! - [`codec`]: the sans-I/O wire protocol (record digests and partitions,
//!   AS_MSG requests and replies, the info protocol, cluster-tending values).
//! - [`open`] dials the seeds with blocking I/O within the dial timeout,
//!   learns the nodes (`node`, `peers-clear-std`) and which node masters each
//!   partition of the namespace (`replicas`), and fails closed.
//! - Each shard dials `conns_per_node` pipelined connections per node
//!   (`crate::pipeline`, the same rules as Redis: bounded in flight, one
//!   sweep for timeouts, placeholders for late replies, fail-all on loss)
//!   and sends every op to its partition's master. A stale map costs a hop
//!   (the server proxies), not an error.
//! - Every request carries its deadline as the transaction TTL, so the
//!   server answers by then.
//!
//! - A tending thread (cold path) polls every node's `partition-generation`
//!   and `peers-generation` each second. A new peers generation means nodes
//!   may have joined: it reads `peers-clear-std`, asks each unknown address
//!   for its `node` id and appends it to the node list. Either change
//!   refetches `replicas` from every node and publishes a new owner map.
//!   Shards pick it up in their sweep task (an atomic load per tick), dial
//!   nodes they have no connections to yet, and until those are up send
//!   such a node's partitions to a node they know, which proxies: the hot
//!   path reads a shard-local copy without locks.

pub mod codec;

use std::cell::{Cell, RefCell};
use std::net::{SocketAddr, TcpStream as StdTcpStream, ToSocketAddrs};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use glommio::net::TcpStream;

use super::{CacheError, Config};
use crate::pipeline::{CallError, Connector, Pipeline, PipelineConfig, Protocol};
use codec::{BinName, Op, Request, ResultCode, Ttl};

/// Requests in flight per connection at most. The server works through one
/// request per connection at a time, so deeper queues only add latency.
const INFLIGHT_MAX: usize = 1024;

/// AS_MSG as the pipeline's reply codec.
pub struct AsMsg;

impl Protocol for AsMsg {
    type Reply = codec::Reply;
    type Error = codec::CodecError;
    fn decode(buf: &[u8]) -> Result<Option<(codec::Reply, usize)>, codec::CodecError> {
        codec::parse_reply(buf)
    }
}

/// A node as learned at open.
#[derive(Debug, Clone)]
struct Node {
    id: String,
    addr: SocketAddr,
    /// Superseded (the same id was found at another address: the node
    /// moved) or departed (no other node has listed it for
    /// [`DEPART_ROUNDS`]): not asked, not routed to, shards close their
    /// connections to it, and the next node to join takes its slot.
    gone: bool,
}

#[derive(Debug)]
struct Settings {
    namespace: String,
    set: String,
    bin: BinName,
    dial_timeout: Duration,
    op_timeout: Duration,
    inflight_max: usize,
    conns_per_node: usize,
    reply_gather: Duration,
    /// Every node found, in discovery order, written by the tending thread
    /// only. An index names one node until it is gone; a later join may
    /// then take the slot, which shards see as a new address there.
    nodes: Mutex<Vec<Node>>,
    /// `nodes.len()`, for shards to notice a join without taking the lock.
    node_count: AtomicUsize,
    /// Master node index per partition (`u16::MAX`: no node claimed it),
    /// as last tended; `owner_gen` counts the maps published.
    owner: Mutex<Arc<[u16]>>,
    owner_gen: AtomicU64,
    /// Tending rounds completed (every node asked once).
    tend_rounds: AtomicU64,
    /// `replicas` answers left out because they did not parse.
    replicas_refused: AtomicU64,
}

/// How often the tending thread polls `partition-generation` and
/// `peers-generation`.
const TEND_INTERVAL: Duration = Duration::from_secs(1);

/// Tending rounds in a row a node must be away from a cluster whose other
/// nodes answer before it counts as departed and its slot is freed: longer
/// than a cluster takes to re-form, so a restart is not a departure.
const DEPART_ROUNDS: u32 = 5;

/// The process-wide Aerospike backend: nodes and the partition map.
#[derive(Debug, Clone)]
pub struct AerospikeBackend {
    inner: Arc<Settings>,
}

/// One shard's connections to one node.
type NodeConns = Vec<Rc<Pipeline<AsMsg>>>;

/// One shard's Aerospike backend.
pub struct AerospikeShard {
    settings: Arc<Settings>,
    /// `conns[node][i]`: the shard's connections to each node, in the
    /// order of `Settings::nodes` (a prefix of it while new nodes are dialed).
    conns: Rc<RefCell<Vec<NodeConns>>>,
    /// Counters of connections replaced (a slot another node took over):
    /// the shard's totals never go down.
    dropped: Rc<Cell<crate::pipeline::PipelineCounters>>,
    next_conn: Cell<usize>,
    /// This shard's copy of the owner map, and which publication it is.
    owner: Rc<RefCell<(u64, Arc<[u16]>)>>,
    /// The op-timeout sweep, which also follows the map and dials joined
    /// nodes: taken (dropping the handle cancels it) by `close`, or a closed
    /// shard would keep ticking, and dialing, for as long as it is held.
    sweeper: RefCell<Option<glommio::Task<()>>>,
}

struct AeroConnector {
    addr: SocketAddr,
    dial_timeout: Duration,
}

impl Connector for AeroConnector {
    type Stream = TcpStream;

    fn peer(&self) -> String {
        format!("aerospike {}", self.addr)
    }
    async fn connect(&self) -> Result<TcpStream, String> {
        let s = TcpStream::connect_timeout(self.addr, self.dial_timeout)
            .await
            .map_err(|e| format!("dialing {}: {e}", self.addr))?;
        s.set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        Ok(s)
    }
}

impl AerospikeBackend {
    /// The nodes known now (found at open or joined since; not those that
    /// moved away), by id.
    pub fn node_ids(&self) -> Vec<String> {
        nodes_of(&self.inner)
            .iter()
            .filter(|n| !n.gone)
            .map(|n| n.id.clone())
            .collect()
    }

    /// Entries of the node table, gone ones included: slots freed by nodes
    /// that moved or left are taken by later joins, so this stays near the
    /// cluster's size however often its nodes come and go.
    pub fn node_slots(&self) -> usize {
        nodes_of(&self.inner).len()
    }

    /// Tending rounds completed since open: each asked every known node for
    /// its generations.
    pub fn tend_rounds(&self) -> u64 {
        self.inner.tend_rounds.load(Ordering::Relaxed)
    }

    /// `replicas` answers that did not parse, at open and while tending:
    /// each left its node's partitions out of that map, not the others'.
    pub fn replicas_refused(&self) -> u64 {
        self.inner.replicas_refused.load(Ordering::Relaxed)
    }

    /// Dials shard `shard`'s connections to every node.
    pub async fn shard(&self, _shard: usize) -> Result<AerospikeShard, CacheError> {
        let s = &self.inner;
        let mut conns = Vec::new();
        // Where each slot's connections dial; `None`: closed (a gone node).
        // A slot a join took over — another node, or the same one back —
        // shows as a different address or as `None`.
        let mut dialed: Vec<Option<SocketAddr>> = Vec::new();
        for node in nodes_of(s) {
            if node.gone {
                // Kept for the indices: closed, so nothing routes there.
                let per_node = dial_node_later(s, &node);
                per_node.iter().for_each(|p| p.close());
                conns.push(per_node);
                dialed.push(None);
            } else {
                conns.push(dial_node(s, &node).await?);
                dialed.push(Some(node.addr));
            }
        }
        let dropped = Rc::new(Cell::new(crate::pipeline::PipelineCounters::default()));
        let kept = dropped.clone();
        let conns = Rc::new(RefCell::new(conns));
        let every = (s.op_timeout / 10).clamp(Duration::from_millis(1), Duration::from_millis(10));
        let owner = Rc::new(RefCell::new(current_owner(s)));
        let (tended, local, swept) = (
            Arc::downgrade(s),
            Rc::downgrade(&owner),
            Rc::downgrade(&conns),
        );
        let sweeper = glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(every).await;
                let now = Instant::now();
                let Some(conns) = swept.upgrade() else { return };
                for p in conns.borrow().iter().flatten() {
                    p.sweep(now);
                }
                // A newer map from the tending thread: one atomic load per
                // tick; the lock only when there is one.
                let Some(s) = tended.upgrade() else { return };
                if let Some(local) = local.upgrade()
                    && s.owner_gen.load(Ordering::Acquire) != local.borrow().0
                {
                    *local.borrow_mut() = current_owner(&s);
                    // Nodes are published before the map: close what goes
                    // to nodes gone (moved or departed: their calls fail;
                    // none is routed there any more), and follow a slot
                    // another node took over to its address.
                    let mut conns = conns.borrow_mut();
                    for (i, (node, per_node)) in
                        nodes_of(&s).iter().zip(conns.iter_mut()).enumerate()
                    {
                        if node.gone {
                            per_node.iter().for_each(|p| p.close());
                            dialed[i] = None;
                        } else if dialed[i] != Some(node.addr) {
                            // What the old connections counted stays in the
                            // shard's totals.
                            let mut d = kept.get();
                            for p in per_node.iter() {
                                p.close();
                                d.add(&p.counters());
                            }
                            kept.set(d);
                            *per_node = dial_node_later(&s, node);
                            dialed[i] = Some(node.addr);
                        }
                    }
                }
                // Nodes that joined: connections that dial in the background.
                let known = conns.borrow().len();
                if s.node_count.load(Ordering::Acquire) > known {
                    let joined = nodes_of(&s);
                    let mut conns = conns.borrow_mut();
                    for node in joined.iter().skip(known) {
                        conns.push(dial_node_later(&s, node));
                        dialed.push(Some(node.addr));
                    }
                }
            }
        });
        Ok(AerospikeShard {
            settings: s.clone(),
            conns,
            dropped,
            next_conn: Cell::new(0),
            owner,
            sweeper: RefCell::new(Some(sweeper)),
        })
    }
}

fn nodes_of(s: &Settings) -> Vec<Node> {
    s.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// How a shard's connection to a node is configured.
fn node_pipeline(s: &Settings, node: &Node) -> (AeroConnector, PipelineConfig) {
    (
        AeroConnector {
            addr: node.addr,
            dial_timeout: s.dial_timeout,
        },
        PipelineConfig {
            inflight_max: s.inflight_max,
            op_timeout: s.op_timeout,
            // All complete replies at once: a node serves a connection's
            // requests one at a time, so handing them out in chunks (and
            // sending after each) overlaps nothing and only adds sends —
            // measured: 16 in flight 139 -> 194 k/s, 6.3 -> 4.7 us/op.
            reply_chunk_min: s.inflight_max,
            reply_chunk_max: s.inflight_max,
            reply_gather: s.reply_gather,
            ..PipelineConfig::default()
        },
    )
}

/// One shard's `conns_per_node` pipelined connections to `node`, dialed
/// now (at open: a node that does not answer fails it).
async fn dial_node(s: &Settings, node: &Node) -> Result<NodeConns, CacheError> {
    let mut per_node = Vec::with_capacity(s.conns_per_node);
    for _ in 0..s.conns_per_node {
        let (connector, config) = node_pipeline(s, node);
        let p = Pipeline::<AsMsg>::connect(connector, config)
            .await
            .map_err(|detail| CacheError::Connect {
                addr: node.addr.to_string(),
                detail,
            })?;
        per_node.push(Rc::new(p));
    }
    Ok(per_node)
}

/// The same for a node found while running: dialed in the background with
/// the reconnect backoff, so a node that does not answer yet neither holds
/// the shard nor keeps the nodes found after it from being dialed.
fn dial_node_later(s: &Settings, node: &Node) -> NodeConns {
    (0..s.conns_per_node)
        .map(|_| {
            let (connector, config) = node_pipeline(s, node);
            Rc::new(Pipeline::<AsMsg>::connect_later(connector, config))
        })
        .collect()
}

fn current_owner(s: &Settings) -> (u64, Arc<[u16]>) {
    // The generation first: a publication landing between the two reads
    // then pairs an old generation with the new map (taken again next
    // time), never a new generation with the old map (kept until the next).
    let generation = s.owner_gen.load(Ordering::Acquire);
    let map = s.owner.lock().unwrap_or_else(|p| p.into_inner()).clone();
    (generation, map)
}

/// The partition map built from the nodes' `replicas` answers.
struct Claims {
    /// Master node index per partition (`u16::MAX`: none claimed it).
    owner: Box<[u16]>,
    /// Some answer listed the namespace.
    listed: bool,
    /// Nodes (by index) whose answer did not parse, and why: left out, so
    /// one node's garbage costs its own partitions (proxied by others), not
    /// every other node's claims with it.
    refused: Vec<(usize, codec::CodecError)>,
}

/// Masters per partition from each node's `replicas`, nodes by index.
fn owners_from(replicas: &[Option<String>], namespace: &str) -> Claims {
    let mut claims = Claims {
        owner: vec![u16::MAX; codec::PARTITIONS].into_boxed_slice(),
        listed: false,
        refused: Vec::new(),
    };
    for (index, r) in replicas.iter().enumerate() {
        let Some(r) = r else { continue };
        match codec::parse_replicas_masters(r, namespace) {
            Ok(Some(masters)) => {
                claims.listed = true;
                for (p, &m) in masters.iter().enumerate() {
                    if m {
                        claims.owner[p] = index as u16;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => claims.refused.push((index, e)),
        }
    }
    claims
}

/// What tending last saw of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Seen {
    partitions: Option<String>,
    peers: Option<String>,
}

impl Seen {
    /// The generations an info reply carries.
    fn of(p: &codec::InfoPairs) -> Self {
        Self {
            partitions: value(p, "partition-generation").map(str::to_owned),
            peers: value(p, "peers-generation").map(str::to_owned),
        }
    }
}

/// The tending loop: while the backend lives, poll every node's
/// `partition-generation` and `peers-generation` each [`TEND_INTERVAL`]; on
/// a peers change, add the nodes that joined; on any change, rebuild the
/// owner map from `replicas` and publish it; ends when the backend is
/// dropped. Bounded per round: each of its five steps (the poll, the peer
/// lists, the new peers' addresses, the joined nodes' generations, the
/// `replicas` reads) asks every address within a dial timeout to connect
/// and one to answer; those that did not answer last time are asked at
/// once, [`ASK_PARALLEL_MAX`] at a time (see [`InfoConns::ask_all`]). So
/// nodes that stay silent cost a step two dial timeouts together, not two
/// each; a node that falls silent costs two more, once, in the step that
/// finds it. The table holds [`codec::PEERS_MAX`] nodes at most.
fn tend(weak: Weak<Settings>, mut seen: Vec<Seen>) {
    let conns = RefCell::new(InfoConns::default());
    // Per node: whether another node listed it as a peer when the map was
    // last built, and rounds in a row it has been away since (see
    // `DEPART_ROUNDS`).
    let mut listed: Vec<bool> = Vec::new();
    let mut away: Vec<u32> = Vec::new();
    // When an unparsable `replicas` answer was last logged as a warning.
    let mut refused_warned_at: Option<Instant> = None;
    loop {
        // Connections only to the nodes we know (joined ones included).
        if let Some(s) = weak.upgrade() {
            let known = nodes_of(&s);
            conns
                .borrow_mut()
                .keep_only(|a| known.iter().any(|n| n.addr == *a && !n.gone));
        }
        let step = Duration::from_millis(50);
        let mut slept = Duration::ZERO;
        while slept < TEND_INTERVAL {
            std::thread::sleep(step);
            slept += step;
            if weak.strong_count() == 0 {
                return;
            }
        }
        let Some(s) = weak.upgrade() else { return };
        let ask = |addrs: &[SocketAddr], cmds: &[&str]| -> Vec<Option<codec::InfoPairs>> {
            conns.borrow_mut().ask_all(addrs, cmds, s.dial_timeout)
        };
        // Every node not gone, at once; gone ones answer `None` unasked.
        let ask_nodes = |nodes: &[Node], cmds: &[&str]| -> Vec<Option<codec::InfoPairs>> {
            let addrs: Vec<SocketAddr> = nodes.iter().filter(|n| !n.gone).map(|n| n.addr).collect();
            let mut answers = ask(&addrs, cmds).into_iter();
            nodes
                .iter()
                .map(|n| {
                    if n.gone {
                        None
                    } else {
                        answers.next().flatten()
                    }
                })
                .collect()
        };
        let mut nodes = nodes_of(&s);
        let now: Vec<Seen> = ask_nodes(&nodes, &["partition-generation", "peers-generation"])
            .iter()
            .map(|p| p.as_ref().map(Seen::of).unwrap_or_default())
            .collect();
        s.tend_rounds.fetch_add(1, Ordering::Relaxed);
        // Departures: while others answer, a node no other node lists as a
        // peer (a change of membership moves peers-generation, and the map
        // is rebuilt) for DEPART_ROUNDS rounds in a row has left the
        // cluster: its slot is freed for a later join. One the others still
        // list stays however long this host cannot reach it, and none
        // departs when nobody answers (this host may be the one cut off).
        listed.resize(nodes.len(), true);
        away.resize(nodes.len(), 0);
        let answering = now.iter().filter(|g| g.partitions.is_some()).count();
        let mut departed = false;
        for i in 0..nodes.len() {
            let alone = answering == 1 && now[i].partitions.is_some();
            let here = listed[i] || alone;
            away[i] = if here || nodes[i].gone {
                0
            } else {
                away[i] + 1
            };
            let others = answering - usize::from(now[i].partitions.is_some());
            let alive = nodes.iter().filter(|n| !n.gone).count();
            if away[i] >= DEPART_ROUNDS && others > 0 && alive > 1 {
                tracing::warn!(node = %nodes[i].id, addr = %nodes[i].addr, "an Aerospike node left the cluster");
                // Left as is: should the map not publish this round, the
                // next (which reads the nodes afresh) marks it again.
                nodes[i].gone = true;
                departed = true;
            }
        }
        if departed {
            // Published with the next map, or now if the map stands.
            seen.clear();
        }
        if now == seen {
            continue;
        }
        // A cluster re-forming (a node reads -1) keeps the map it had; the
        // next round, with `seen` unchanged, looks again.
        if now.iter().any(|g| g.partitions.as_deref() == Some("-1")) {
            tracing::debug!("tending: the cluster is forming; keeping the old map");
            continue;
        }
        let peers_changed = now
            .iter()
            .zip(seen.iter().chain(std::iter::repeat(&Seen::default())))
            .any(|(a, b)| a.peers.is_some() && a.peers != b.peers);
        let mut now = now;
        let mut discovered = true;
        if peers_changed {
            let (joined, complete) = discover_joined(&nodes, &ask);
            discovered = complete;
            let addrs: Vec<SocketAddr> = joined.iter().map(|j| j.addr).collect();
            let generations = ask(&addrs, &["partition-generation", "peers-generation"]);
            for (joined, generations) in joined.into_iter().zip(generations) {
                for old in nodes.iter_mut().filter(|n| n.id == joined.id && !n.gone) {
                    tracing::info!(node = %old.id, from = %old.addr, to = %joined.addr, "an Aerospike node moved");
                    old.gone = true;
                }
                let generations = generations.as_ref().map(Seen::of).unwrap_or_default();
                // A slot a gone node left, or a new one up to the bound:
                // nodes that move or leave and come back elsewhere (pods
                // rescheduled) never run the table out.
                let slot = match nodes.iter().position(|n| n.gone) {
                    Some(i) => i,
                    None if nodes.len() < codec::PEERS_MAX => {
                        nodes.push(joined.clone());
                        now.push(Seen::default());
                        listed.push(true);
                        away.push(0);
                        nodes.len() - 1
                    }
                    None => {
                        tracing::warn!(
                            node = %joined.id,
                            addr = %joined.addr,
                            "{} Aerospike nodes known and none gone: not following this one",
                            codec::PEERS_MAX
                        );
                        break;
                    }
                };
                tracing::info!(node = %joined.id, addr = %joined.addr, "an Aerospike node joined");
                nodes[slot] = joined;
                now[slot] = generations;
                (listed[slot], away[slot]) = (true, 0);
            }
        }
        // Each node's claims, and who it lists as its peers (one round trip).
        let read: Vec<Option<(String, Vec<String>)>> =
            ask_nodes(&nodes, &["replicas", "peers-clear-std"])
                .into_iter()
                .map(|p| {
                    let p = p?;
                    let replicas = value(&p, "replicas")?.to_owned();
                    let peers = value(&p, "peers-clear-std")
                        .and_then(|v| codec::parse_peers_clear_std(v).ok())
                        .map(|peers| peers.nodes.into_iter().map(|p| p.id).collect())
                        .unwrap_or_default();
                    Some((replicas, peers))
                })
                .collect();
        let members = members(&nodes, &read);
        // Who lists whom, from a round that read every node that answered
        // its poll (a list not read could have named anyone).
        let lists_read = (0..nodes.len()).all(|j| read[j].is_some() || now[j].partitions.is_none());
        if lists_read {
            for (i, n) in nodes.iter().enumerate() {
                listed[i] = read.iter().enumerate().any(|(j, r)| {
                    j != i && r.as_ref().is_some_and(|(_, peers)| peers.contains(&n.id))
                });
            }
        }
        // What could not be read this round must be read again next round,
        // even if no generation moves: forget what was seen of it.
        for (seen_now, r) in now.iter_mut().zip(&read) {
            if r.is_none() {
                seen_now.partitions = None;
            }
            if !discovered {
                seen_now.peers = None;
            }
        }
        let replicas: Vec<Option<String>> = read
            .into_iter()
            .zip(&members)
            .map(|(r, &member)| r.filter(|_| member).map(|(replicas, _)| replicas))
            .collect();
        let claims = owners_from(&replicas, &s.namespace);
        // An answer that did not parse counts as one not read: its node's
        // partitions stay unclaimed (proxied by others) and it is read again
        // next round; the others' claims stand. One warning a minute at most.
        let warn = refused_warned_at.is_none_or(|at| at.elapsed() >= REFUSED_WARN_EVERY);
        for (i, e) in &claims.refused {
            now[*i].partitions = None;
            s.replicas_refused.fetch_add(1, Ordering::Relaxed);
            let (node, addr) = (&nodes[*i].id, nodes[*i].addr);
            if warn {
                tracing::warn!(%node, %addr, error = %e, "tending: unparsable replicas answer left out of the map");
            } else {
                tracing::debug!(%node, %addr, error = %e, "tending: unparsable replicas answer left out of the map");
            }
        }
        if warn && !claims.refused.is_empty() {
            refused_warned_at = Some(Instant::now());
        }
        if claims.owner.iter().any(|&o| o != u16::MAX) {
            // Nodes first, then the map that may name them.
            let count = nodes.len();
            *s.nodes.lock().unwrap_or_else(|p| p.into_inner()) = nodes;
            s.node_count.store(count, Ordering::Release);
            *s.owner.lock().unwrap_or_else(|p| p.into_inner()) = Arc::from(claims.owner);
            s.owner_gen.fetch_add(1, Ordering::AcqRel);
            seen = now;
        } else {
            tracing::debug!("tending: no node claims a partition; keeping the old map");
        }
    }
}

/// How often tending warns of `replicas` answers it cannot parse (the rest
/// go to debug): a node that keeps answering one is read every round.
const REFUSED_WARN_EVERY: Duration = Duration::from_secs(60);

/// Which nodes' claims count: those another answering node lists as a
/// peer, or the one node that answered. A node that left the cluster and
/// carries on alone (restarted on its own) answers, lists no peers and is
/// listed by none: believing its claims would send writes to a store the
/// other instances no longer use. Not read this round (`None`): not a
/// member now (its claims are not there to count anyway).
fn members(nodes: &[Node], read: &[Option<(String, Vec<String>)>]) -> Vec<bool> {
    let answered = read.iter().filter(|r| r.is_some()).count();
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            read[i].is_some()
                && (answered == 1
                    || read.iter().enumerate().any(|(j, r)| {
                        j != i && r.as_ref().is_some_and(|(_, peers)| peers.contains(&n.id))
                    }))
        })
        .collect()
}

/// Addresses one step of a tending round asks at once at most (one thread
/// each); more wait for the next batch.
const ASK_PARALLEL_MAX: usize = 16;

/// The tending thread's info connections, one per node address, kept
/// between rounds: a server counts every connection opened, and a round a
/// second should not open one per node each time.
#[derive(Default)]
struct InfoConns {
    by_addr: Vec<(SocketAddr, StdTcpStream)>,
}

impl InfoConns {
    /// One info round trip to each of `addrs` (each address once), answers
    /// in the order asked, each within `timeout` to connect and `timeout`
    /// to answer (see [`ask_one`]). Addresses with a kept connection
    /// answered last time and are asked one after another on this thread;
    /// the rest (new, or silent last time) are asked at the same time, one
    /// thread each, [`ASK_PARALLEL_MAX`] at a time. So a healthy cluster
    /// starts no thread, and nodes that do not answer cost a step two
    /// timeouts together, not two each; one that falls silent costs its
    /// inline ask two timeouts once, then joins the threaded ones.
    fn ask_all(
        &mut self,
        addrs: &[SocketAddr],
        cmds: &[&str],
        timeout: Duration,
    ) -> Vec<Option<codec::InfoPairs>> {
        let mut unique: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
        for a in addrs {
            if !unique.contains(a) {
                unique.push(*a);
            }
        }
        let (inline, threaded): (Vec<_>, Vec<_>) = unique
            .iter()
            .map(|a| (*a, self.take(a)))
            .partition(|(_, kept)| kept.is_some());
        let mut done: Vec<(SocketAddr, Option<StdTcpStream>, Option<codec::InfoPairs>)> =
            Vec::with_capacity(unique.len());
        let mut threaded = threaded.into_iter().peekable();
        let mut inline = inline.into_iter();
        // Each pass runs a batch of threads while this thread asks the
        // inline addresses; the inline ones are all asked in the first pass.
        while threaded.peek().is_some() || inline.len() > 0 {
            let batch: Vec<_> = threaded.by_ref().take(ASK_PARALLEL_MAX).collect();
            if batch.len() == 1 && inline.len() == 0 {
                // A lone address needs no thread.
                let (addr, kept) = batch.into_iter().next().expect("one");
                let (stream, pairs) = ask_one(&addr, kept, cmds, timeout);
                done.push((addr, stream, pairs));
                continue;
            }
            std::thread::scope(|scope| {
                let running: Vec<_> = batch
                    .into_iter()
                    .map(|(addr, kept)| {
                        let handle = std::thread::Builder::new()
                            .name("txgate-aero-info".into())
                            .spawn_scoped(scope, move || ask_one(&addr, kept, cmds, timeout));
                        (addr, handle)
                    })
                    .collect();
                for (addr, kept) in inline.by_ref() {
                    let (stream, pairs) = ask_one(&addr, kept, cmds, timeout);
                    done.push((addr, stream, pairs));
                }
                // A thread that could not start is a node not read this
                // round (its kept connection closes; the next dials anew).
                for (addr, handle) in running {
                    let (stream, pairs) = handle
                        .ok()
                        .and_then(|h| h.join().ok())
                        .unwrap_or((None, None));
                    done.push((addr, stream, pairs));
                }
            });
        }
        for (addr, stream, _) in &mut done {
            if let Some(stream) = stream.take()
                && self.by_addr.len() < codec::PEERS_MAX
            {
                self.by_addr.push((*addr, stream));
            }
        }
        addrs
            .iter()
            .map(|a| {
                done.iter()
                    .find(|(addr, _, _)| addr == a)
                    .and_then(|(_, _, pairs)| pairs.clone())
            })
            .collect()
    }

    /// The kept connection to `addr`, if any, out of the table.
    fn take(&mut self, addr: &SocketAddr) -> Option<StdTcpStream> {
        let i = self.by_addr.iter().position(|(a, _)| a == addr)?;
        Some(self.by_addr.swap_remove(i).1)
    }

    fn keep_only(&mut self, known: impl Fn(&SocketAddr) -> bool) {
        self.by_addr.retain(|(a, _)| known(a));
    }
}

/// One info round trip to `addr` within `timeout`: on the kept connection,
/// or a fresh one if there is none or the kept one failed other than by
/// timing out (a server restart or an idle close leaves it dead). A timeout
/// drops the kept connection without redialing in this call; the next call
/// to the address dials afresh. Returns the connection to keep, if any.
fn ask_one(
    addr: &SocketAddr,
    kept: Option<StdTcpStream>,
    cmds: &[&str],
    timeout: Duration,
) -> (Option<StdTcpStream>, Option<codec::InfoPairs>) {
    let text = addr.to_string();
    if let Some(mut stream) = kept {
        match info_blocking(&mut stream, &text, cmds, Instant::now() + timeout) {
            Ok(pairs) => return (Some(stream), Some(pairs)),
            Err(CacheError::DialTimeout { .. }) => return (None, None),
            Err(_) => {}
        }
    }
    let Ok(mut stream) = StdTcpStream::connect_timeout(addr, timeout) else {
        return (None, None);
    };
    match info_blocking(&mut stream, &text, cmds, Instant::now() + timeout) {
        Ok(pairs) => (Some(stream), Some(pairs)),
        Err(_) => (None, None),
    }
}

/// Info round trips to several addresses at once, answers in order (see
/// [`InfoConns::ask_all`]).
type AskAll<'a> = dyn Fn(&[SocketAddr], &[&str]) -> Vec<Option<codec::InfoPairs>> + 'a;

/// Nodes that `peers-clear-std` of the known nodes names but we do not
/// know yet, each confirmed by asking it for its `node` id; and whether
/// every list was read and every new node confirmed (if not, tending looks
/// again next round). The lists are read at once, then every address of
/// every new peer is asked at once: peers that do not answer cost two dial
/// timeouts together, not two each.
fn discover_joined(known: &[Node], ask: &AskAll<'_>) -> (Vec<Node>, bool) {
    let mut complete = true;
    // Gone nodes neither list peers nor count as known: one that left and
    // comes back is a join, even at its old address.
    let known: Vec<&Node> = known.iter().filter(|n| !n.gone).collect();
    let known_addrs: Vec<SocketAddr> = known.iter().map(|n| n.addr).collect();
    // Each new peer is tried once a round at the same addresses, however
    // many lists name it.
    let mut candidates: Vec<(String, Vec<SocketAddr>)> = Vec::new();
    for pairs in ask(&known_addrs, &["peers-clear-std"]) {
        let Some(Ok(peers)) = pairs
            .as_ref()
            .and_then(|p| value(p, "peers-clear-std"))
            .map(codec::parse_peers_clear_std)
        else {
            complete = false;
            continue;
        };
        for p in peers.nodes {
            let addrs: Vec<SocketAddr> = p
                .addrs
                .iter()
                .filter_map(|(h, port)| {
                    let text = if h.contains(':') {
                        format!("[{h}]:{port}")
                    } else {
                        format!("{h}:{port}")
                    };
                    text.to_socket_addrs().ok().and_then(|mut a| a.next())
                })
                .collect();
            // Known means the same id at one of the addresses listed: the
            // same id elsewhere is the node moved (a pod rescheduled with
            // a fixed node id), to be followed there.
            if known
                .iter()
                .any(|k| k.id == p.id && addrs.contains(&k.addr))
            {
                continue;
            }
            if candidates.iter().any(|(id, a)| *id == p.id && *a == addrs) {
                continue;
            }
            candidates.push((p.id, addrs));
        }
    }
    let tried: Vec<SocketAddr> = candidates
        .iter()
        .flat_map(|(_, addrs)| addrs.iter().copied())
        .collect();
    let answers = ask(&tried, &["node"]);
    let id_at = |addr: &SocketAddr| -> Option<String> {
        let i = tried.iter().position(|a| a == addr)?;
        answers[i]
            .as_ref()
            .and_then(|p| value(p, "node"))
            .filter(|id| !id.is_empty() && !id.starts_with("ERROR"))
            .map(str::to_owned)
    };
    let mut joined: Vec<Node> = Vec::new();
    for (id, addrs) in &candidates {
        // Listed at two address lists that share one: followed once.
        if joined
            .iter()
            .any(|j| j.id == *id && addrs.contains(&j.addr))
        {
            continue;
        }
        // The first address listed that answers.
        match addrs.iter().find_map(|a| id_at(a).map(|got| (got, *a))) {
            Some((id, addr)) => joined.push(Node {
                id,
                addr,
                gone: false,
            }),
            None => complete = false,
        }
    }
    (joined, complete)
}

fn server_error(op: &'static str, code: ResultCode) -> CacheError {
    CacheError::Backend {
        op,
        detail: format!("server answered {code}"),
    }
}

/// Whole seconds, rounded up (a TTL never ends early), at least 1; zero is
/// "never expire". One over [`codec::TTL_MAX_S`] is refused here, by name,
/// rather than sent for the server to refuse as a bare PARAMETER.
fn ttl_of(op: &'static str, ttl: Duration) -> Result<Ttl, CacheError> {
    if ttl.is_zero() {
        return Ok(Ttl::Never);
    }
    let s = ttl.as_nanos().div_ceil(1_000_000_000).max(1);
    if s > u128::from(codec::TTL_MAX_S) {
        return Err(CacheError::Backend {
            op,
            detail: format!(
                "TTL of {s} s is over Aerospike's longest, {} s (10 years)",
                codec::TTL_MAX_S
            ),
        });
    }
    Ok(Ttl::Seconds(s as u32))
}

impl AerospikeShard {
    /// Counters summed over this shard's connections to every node.
    pub fn counters(&self) -> crate::pipeline::PipelineCounters {
        let mut t = self.dropped.get();
        for p in self.conns.borrow().iter().flatten() {
            t.add(&p.counters());
        }
        t
    }

    /// (up now, all) of the shard's connections to the nodes in the table.
    pub fn connections_up(&self) -> (u64, u64) {
        self.conns
            .borrow()
            .iter()
            .flatten()
            .fold((0, 0), |(up, all), p| (up + u64::from(p.is_up()), all + 1))
    }

    /// The connection for `key`'s partition master (round-robin over the
    /// node's connections), and the key's digest.
    fn route(&self, key: &[u8]) -> (Rc<Pipeline<AsMsg>>, [u8; codec::DIGEST_LEN]) {
        let d = codec::digest(self.settings.set.as_bytes(), key);
        let pid = codec::partition_id(&d) as usize;
        let owner = self.owner.borrow().1[pid] as usize;
        let conns = self.conns.borrow();
        // An unclaimed partition, or one whose master is not connected (yet:
        // a node that joined is dialed in the background), goes to a node
        // that is, which proxies it.
        let node = if owner < conns.len() && conns[owner].iter().any(|p| p.is_up()) {
            owner
        } else {
            // One that is connected, if any: a down one would fail the op.
            let n = conns.len();
            (0..n)
                .map(|k| (pid + k) % n)
                .find(|&i| conns[i].iter().any(|p| p.is_up()))
                .unwrap_or(pid % n)
        };
        let per_node = &conns[node];
        let i = self.next_conn.get();
        self.next_conn.set(i.wrapping_add(1));
        debug_assert!(!per_node.is_empty());
        // Round-robin over the node's connections that are up: one that is
        // redialing would fail the op while another to the same node works.
        let n = per_node.len();
        let pick = (0..n)
            .map(|k| (i + k) % n)
            .find(|&j| per_node[j].is_up())
            .unwrap_or(i % n);
        (per_node[pick].clone(), d)
    }

    async fn request(&self, key: &[u8], op: Op<'_>) -> Result<codec::Reply, CallError> {
        let (conn, digest) = self.route(key);
        let s = &self.settings;
        let req = Request {
            namespace: s.namespace.as_bytes(),
            set: s.set.as_bytes(),
            digest: &digest,
            // 0 would mean the server's default (1 s): round a sub-ms op
            // timeout up instead.
            timeout_ms: s.op_timeout.as_millis().clamp(1, u32::MAX as u128) as u32,
            op,
        };
        conn.call(|b| {
            // Inputs were checked before the call (TTL built by `ttl_of`,
            // bin name at open, value size below), so this cannot fail; a
            // failure would leave a request without bytes, so it must not.
            codec::encode_request(&req, b).expect("request validated before the call")
        })
        .await
    }

    fn check_value(op: &'static str, val: &[u8]) -> Result<(), CacheError> {
        if val.len() > codec::PROTO_BODY_MAX - 4096 {
            return Err(CacheError::Backend {
                op,
                detail: format!(
                    "value of {} bytes is over the 128 MiB frame limit",
                    val.len()
                ),
            });
        }
        Ok(())
    }

    /// CREATE_ONLY write: OK created, RECORD_EXISTS already there.
    pub async fn set_nx(&self, key: &[u8], val: &[u8], ttl: Duration) -> Result<bool, CacheError> {
        Self::check_value("set_nx", val)?;
        let op = Op::SetNx {
            ttl: ttl_of("set_nx", ttl)?,
            bin: self.settings.bin,
            value: val,
        };
        match self.request(key, op).await {
            Ok(r) if r.result == ResultCode::OK => Ok(true),
            Ok(r) if r.result == ResultCode::RECORD_EXISTS => Ok(false),
            Ok(r) => Err(server_error("set_nx", r.result)),
            Err(e) => Err(CacheError::from_call("set_nx", e, self.settings.op_timeout)),
        }
    }

    /// CREATE_OR_REPLACE write.
    pub async fn set(&self, key: &[u8], val: &[u8], ttl: Duration) -> Result<(), CacheError> {
        Self::check_value("set", val)?;
        let op = Op::Set {
            ttl: ttl_of("set", ttl)?,
            bin: self.settings.bin,
            value: val,
        };
        match self.request(key, op).await {
            Ok(r) if r.result == ResultCode::OK => Ok(()),
            Ok(r) => Err(server_error("set", r.result)),
            Err(e) => Err(CacheError::from_call("set", e, self.settings.op_timeout)),
        }
    }

    /// Read of the value bin; NOT_FOUND is a miss.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CacheError> {
        let op = Op::Get {
            bin: self.settings.bin,
        };
        match self.request(key, op).await {
            // A record without our bin (another writer's, or written under
            // another --aero-bin) holds no value of ours: a miss.
            Ok(r) if r.result == ResultCode::OK => {
                Ok(r.bin(self.settings.bin.as_bytes()).map(|b| b.value.clone()))
            }
            Ok(r) if r.result == ResultCode::NOT_FOUND => Ok(None),
            Ok(r) => Err(server_error("get", r.result)),
            Err(e) => Err(CacheError::from_call("get", e, self.settings.op_timeout)),
        }
    }

    /// Delete; OK and NOT_FOUND both mean gone.
    pub async fn del(&self, key: &[u8]) -> Result<(), CacheError> {
        match self.request(key, Op::Del).await {
            Ok(r) if r.result == ResultCode::OK || r.result == ResultCode::NOT_FOUND => Ok(()),
            Ok(r) => Err(server_error("del", r.result)),
            Err(e) => Err(CacheError::from_call("del", e, self.settings.op_timeout)),
        }
    }

    /// Info `status` on every node the current map names as a master (all
    /// known nodes when it names none), one after another, each within the
    /// dial timeout; cold path. A node the cluster no longer uses does not
    /// make the store unhealthy.
    pub async fn healthy(&self) -> bool {
        let (_, owner) = current_owner(&self.settings);
        let nodes = nodes_of(&self.settings);
        let masters: Vec<&Node> = nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| owner.iter().any(|&o| usize::from(o) == *i))
            .map(|(_, n)| n)
            .collect();
        let probed = if masters.is_empty() {
            nodes.iter().collect()
        } else {
            masters
        };
        for node in probed {
            let probe = info_async(node.addr, &["status"], self.settings.dial_timeout);
            match probe.await {
                Ok(pairs) if pairs.iter().any(|(k, v)| k == "status" && v == "ok") => {}
                _ => return false,
            }
        }
        true
    }

    /// Fails everything in flight, stops reconnecting, and stops the sweep
    /// (nothing is in flight to time out, and it must dial no joined node).
    pub fn close(&self) {
        self.sweeper.borrow_mut().take();
        for p in self.conns.borrow().iter().flatten() {
            p.close();
        }
    }
}

async fn info_async(
    addr: SocketAddr,
    cmds: &[&str],
    timeout: Duration,
) -> Result<codec::InfoPairs, String> {
    use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut s = TcpStream::connect_timeout(addr, timeout)
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        codec::encode_info(cmds, &mut out);
        s.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while buf.len() < 1 << 20 {
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some((pairs, _)) = codec::parse_info_reply(&buf).map_err(|e| e.to_string())? {
                return Ok(pairs);
            }
        }
        Err("info reply too large".into())
    };
    match glommio::timer::timeout(timeout, async { Ok(work.await) }).await {
        Ok(r) => r,
        Err(_) => Err(format!("no info reply within {timeout:?}")),
    }
}

/// One blocking info round trip on `stream`, within `deadline`.
fn info_blocking(
    stream: &mut StdTcpStream,
    addr: &str,
    cmds: &[&str],
    deadline: Instant,
) -> Result<codec::InfoPairs, CacheError> {
    use super::blocking::{RoundTripError, round_trip};
    let mut out = Vec::new();
    codec::encode_info(cmds, &mut out);
    let set_timeout = |s: &StdTcpStream, left: Duration| {
        s.set_read_timeout(Some(left))?;
        s.set_write_timeout(Some(left))
    };
    let connect = |detail: String| CacheError::Connect {
        addr: addr.to_owned(),
        detail,
    };
    round_trip(
        stream,
        set_timeout,
        &out,
        deadline,
        16 << 20,
        codec::parse_info_reply,
    )
    .map_err(|e| match e {
        RoundTripError::Timeout => CacheError::DialTimeout {
            addr: addr.to_owned(),
            after_ms: 0,
        },
        RoundTripError::Io(e) => connect(e.to_string()),
        RoundTripError::Closed => connect("closed the connection".into()),
        RoundTripError::Decode(e, _) => connect(format!("not an Aerospike server: {e}")),
        RoundTripError::TooLarge => connect("info reply too large".into()),
    })
}

fn value<'a>(pairs: &'a codec::InfoPairs, name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// How often `open` asks again while the cluster is still forming.
const FORMING_RETRY: Duration = Duration::from_millis(100);

/// Dials the seeds and learns the cluster within the dial timeout; fails
/// closed with a specific error. A cluster that lists the namespace but
/// masters none of its partitions yet (a server a second after start: its
/// `partition-generation` is -1 until the cluster forms) is asked again
/// until the dial timeout.
pub fn open(config: &Config) -> Result<AerospikeBackend, CacheError> {
    let namespace = config
        .aero_namespace
        .clone()
        .ok_or_else(|| CacheError::Config("aerospike needs a namespace".into()))?;
    let bin =
        BinName::new(config.aero_bin.as_bytes()).map_err(|e| CacheError::Config(e.to_string()))?;
    if config.aero_hosts.is_empty() {
        return Err(CacheError::Config("aerospike needs seed hosts".into()));
    }
    let deadline = Instant::now() + config.dial_timeout;
    loop {
        match discover(config, &namespace, deadline)? {
            Discovery::Cluster(nodes, gens, owner, refused) => {
                for node in &refused {
                    tracing::warn!(%node, "open: unparsable replicas answer left out of the map");
                }
                probe_ttl(config, &namespace, bin, &nodes, &owner, deadline)?;
                let refused = refused.len() as u64;
                return start(config, namespace, bin, nodes, gens, owner, refused);
            }
            Discovery::Forming(found, refused) => {
                if Instant::now() + FORMING_RETRY >= deadline {
                    let refused = if refused.is_empty() {
                        String::new()
                    } else {
                        format!("; unparsable replicas answer from {}", refused.join("; "))
                    };
                    // A cluster still forming is an outage, not our
                    // settings: waiting (a fail-open boot's retries) fixes it.
                    return Err(CacheError::Connect {
                        addr: config.aero_hosts.join(","),
                        detail: format!(
                            "namespace '{namespace}' is not served by any of the {found} \
                             node(s) found: the cluster was still forming after the dial \
                             timeout ({} ms){refused}",
                            config.dial_timeout.as_millis()
                        ),
                    });
                }
                std::thread::sleep(FORMING_RETRY);
            }
        }
    }
}

/// The record `open` writes (with a TTL) and deletes to learn whether the
/// namespace takes TTLs.
const PROBE_KEY: &[u8] = b"txgate:open-probe";

/// Writes and deletes a record with a TTL. A namespace that refuses TTLs
/// (`nsup-period 0` without `allow-ttl-without-nsup`, the server's default
/// since 4.9) answers FORBIDDEN to every claim, which would then fail open —
/// no dedup across instances, behind a healthy `/readyz` — so `open` fails
/// closed and says what to set. Any other outcome (a timeout, a node not
/// ready) is left to the claims: only the refusal is certain.
fn probe_ttl(
    config: &Config,
    namespace: &str,
    bin: BinName,
    nodes: &[Node],
    owner: &[u16],
    deadline: Instant,
) -> Result<(), CacheError> {
    use super::blocking::round_trip;
    let set = config.aero_set.as_bytes();
    let digest = codec::digest(set, PROBE_KEY);
    let master = owner[codec::partition_id(&digest) as usize] as usize;
    let Some(node) = nodes.get(master).or(nodes.first()) else {
        return Ok(());
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let Ok(mut stream) =
        StdTcpStream::connect_timeout(&node.addr, left.max(Duration::from_millis(1)))
    else {
        return Ok(());
    };
    let set_timeout = |s: &StdTcpStream, left: Duration| {
        s.set_read_timeout(Some(left))?;
        s.set_write_timeout(Some(left))
    };
    let mut ask = |op: Op<'_>| {
        let mut out = Vec::new();
        let req = Request {
            namespace: namespace.as_bytes(),
            set,
            digest: &digest,
            timeout_ms: left.as_millis().clamp(1, u32::MAX as u128) as u32,
            op,
        };
        codec::encode_request(&req, &mut out).ok()?;
        round_trip(
            &mut stream,
            set_timeout,
            &out,
            deadline,
            1 << 20,
            codec::parse_reply,
        )
        .ok()
    };
    let wrote = ask(Op::Set {
        ttl: Ttl::Seconds(60),
        bin,
        value: b"probe",
    });
    match wrote {
        Some(r) if r.result == ResultCode::FORBIDDEN => Err(CacheError::Config(format!(
            "namespace '{namespace}' refuses records with a TTL (FORBIDDEN from {}): every \
             claim would fail open; give it nsup-period > 0 (or allow-ttl-without-nsup true)",
            node.addr
        ))),
        Some(r) if r.result == ResultCode::OK => {
            let _ = ask(Op::Del);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// What one pass over the seeds found.
enum Discovery {
    /// Nodes, their generations, the partition owners, and the `replicas`
    /// answers left out as unparsable (address and problem).
    Cluster(Vec<Node>, Vec<Seen>, Box<[u16]>, Vec<String>),
    /// This many nodes answered, none masters a partition of the namespace,
    /// and their cluster is still forming (a node reads
    /// `partition-generation` -1, or lists the namespace with no partitions);
    /// the unparsable `replicas` answers, by address and problem.
    Forming(usize, Vec<String>),
}

/// One pass: dials the seeds and the peers they name, reads each node's id,
/// generations and masters.
fn discover(config: &Config, namespace: &str, deadline: Instant) -> Result<Discovery, CacheError> {
    // Whether the namespace's partitions may yet appear: see `Forming`.
    let mut listed = false;
    let mut nodes: Vec<Node> = Vec::new();
    let mut gens: Vec<Seen> = Vec::new();
    // Per node found: its `replicas` (unless forming), and (for `members`)
    // the ids of the peers it lists.
    let mut replicas_of: Vec<Option<String>> = Vec::new();
    let mut read: Vec<Option<(String, Vec<String>)>> = Vec::new();
    let mut to_visit: Vec<String> = config.aero_hosts.clone();
    let mut last_error = None;
    let mut visited = 0;
    // Bounded: every node is visited once; peers add at most PEERS_MAX.
    while let Some(host) = to_visit.pop() {
        visited += 1;
        if visited > codec::PEERS_MAX + config.aero_hosts.len() {
            break;
        }
        let addr = match host.to_socket_addrs().ok().and_then(|mut a| a.next()) {
            Some(a) => a,
            None => {
                last_error = Some(CacheError::Connect {
                    addr: host.clone(),
                    detail: "cannot resolve".into(),
                });
                continue;
            }
        };
        if nodes.iter().any(|n| n.addr == addr) {
            continue;
        }
        // Each host gets its share of what is left, so one that accepts and
        // never answers cannot use up the budget of a healthy one after it.
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now) / (to_visit.len() as u32 + 1);
        let visit_deadline = now + left;
        let mut stream =
            match StdTcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1))) {
                Ok(s) => s,
                Err(e) => {
                    last_error = Some(match e.kind() {
                        std::io::ErrorKind::ConnectionRefused => {
                            CacheError::Refused { addr: host.clone() }
                        }
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                            CacheError::DialTimeout {
                                addr: host.clone(),
                                after_ms: config.dial_timeout.as_millis() as u64,
                            }
                        }
                        _ => CacheError::Connect {
                            addr: host.clone(),
                            detail: e.to_string(),
                        },
                    });
                    continue;
                }
            };
        let pairs = match info_blocking(
            &mut stream,
            &host,
            &[
                "node",
                "partition-generation",
                "peers-generation",
                "replicas",
                "peers-clear-std",
            ],
            visit_deadline,
        ) {
            Ok(p) => p,
            Err(CacheError::DialTimeout { addr, .. }) => {
                last_error = Some(CacheError::DialTimeout {
                    addr,
                    after_ms: config.dial_timeout.as_millis() as u64,
                });
                continue;
            }
            Err(e) => {
                last_error = Some(e);
                continue;
            }
        };
        let id = value(&pairs, "node").unwrap_or_default().to_owned();
        if id.is_empty() || id.starts_with("ERROR") {
            last_error = Some(CacheError::Connect {
                addr: host.clone(),
                detail: "answered no node id: not an Aerospike node".into(),
            });
            continue;
        }
        // A node whose cluster is still forming reads -1 here; it lists the
        // namespace with no partitions, or not at all, or already with its
        // partitions while still answering writes UNAVAILABLE (seen on CE
        // 8.1): its map is not used until the generation moves on.
        let forming = value(&pairs, "partition-generation") == Some("-1");
        listed |= forming;
        nodes.push(Node {
            id,
            addr,
            gone: false,
        });
        gens.push(Seen::of(&pairs));
        replicas_of.push(
            value(&pairs, "replicas")
                .filter(|_| !forming)
                .map(str::to_owned),
        );
        let mut peer_ids = Vec::new();
        if let Some(peers) = value(&pairs, "peers-clear-std")
            && let Ok(peers) = codec::parse_peers_clear_std(peers)
        {
            for p in peers.nodes {
                peer_ids.push(p.id.clone());
                for (h, port) in p.addrs {
                    let text = if h.contains(':') {
                        format!("[{h}]:{port}")
                    } else {
                        format!("{h}:{port}")
                    };
                    to_visit.push(text);
                }
            }
        }
        read.push(Some((String::new(), peer_ids)));
    }
    // Only members' claims count, as when tending: a node that left the
    // cluster and carries on alone (a seed that was taken out and restarted)
    // claims every partition, and visited last it would own them all until
    // some generation moved — for days, on a calm cluster.
    let member = members(&nodes, &read);
    let replicas: Vec<Option<String>> = replicas_of
        .into_iter()
        .zip(&member)
        .map(|(r, &member)| r.filter(|_| member))
        .collect();
    // A node whose answer does not parse is left out, as when tending: the
    // others' claims make the map, and its partitions are proxied.
    let claims = owners_from(&replicas, namespace);
    listed |= claims.listed;
    let refused: Vec<String> = claims
        .refused
        .iter()
        .map(|(i, e)| format!("{} ({e})", nodes[*i].addr))
        .collect();
    if nodes.is_empty() {
        return Err(last_error.unwrap_or_else(|| CacheError::Connect {
            addr: config.aero_hosts.join(","),
            detail: "no Aerospike node answered".into(),
        }));
    }
    if claims.owner.iter().all(|&o| o == u16::MAX) {
        if listed {
            return Ok(Discovery::Forming(nodes.len(), refused));
        }
        if !refused.is_empty() {
            return Err(CacheError::Connect {
                addr: config.aero_hosts.join(","),
                detail: format!(
                    "no usable partition map for namespace '{namespace}': unparsable replicas \
                     answer from {}",
                    refused.join("; ")
                ),
            });
        }
        return Err(CacheError::Config(format!(
            "namespace '{namespace}' is not served by any of the {} node(s) found",
            nodes.len()
        )));
    }
    Ok(Discovery::Cluster(nodes, gens, claims.owner, refused))
}

/// Publishes what `open` found and starts tending it.
fn start(
    config: &Config,
    namespace: String,
    bin: BinName,
    nodes: Vec<Node>,
    gens: Vec<Seen>,
    owner: Box<[u16]>,
    replicas_refused: u64,
) -> Result<AerospikeBackend, CacheError> {
    let inner = Arc::new(Settings {
        namespace,
        set: config.aero_set.clone(),
        bin,
        dial_timeout: config.dial_timeout,
        op_timeout: config.op_timeout,
        inflight_max: INFLIGHT_MAX,
        conns_per_node: config.aero_conns_per_node.max(1),
        reply_gather: config.aero_reply_gather,
        node_count: AtomicUsize::new(nodes.len()),
        nodes: Mutex::new(nodes),
        owner: Mutex::new(Arc::from(owner)),
        owner_gen: AtomicU64::new(0),
        tend_rounds: AtomicU64::new(0),
        replicas_refused: AtomicU64::new(replicas_refused),
    });
    let weak = Arc::downgrade(&inner);
    std::thread::Builder::new()
        .name("txgate-aero-tend".into())
        .spawn(move || tend(weak, gens))
        .map_err(|e| CacheError::Config(format!("starting the tending thread: {e}")))?;
    Ok(AerospikeBackend { inner })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds_and_zero_never_expires() {
        let ttl = |d| ttl_of("set", d).unwrap();
        assert_eq!(ttl(Duration::ZERO), Ttl::Never);
        assert_eq!(ttl(Duration::from_millis(1)), Ttl::Seconds(1));
        assert_eq!(ttl(Duration::from_millis(1500)), Ttl::Seconds(2));
        assert_eq!(ttl(Duration::from_secs(60)), Ttl::Seconds(60));
        assert_eq!(
            ttl(Duration::from_secs(codec::TTL_MAX_S.into())),
            Ttl::Seconds(codec::TTL_MAX_S)
        );
    }

    #[test]
    fn a_ttl_over_ten_years_is_refused_naming_the_limit() {
        // A hair over rounds up past the limit: refused too.
        for over in [
            Duration::from_secs(u64::from(codec::TTL_MAX_S)) + Duration::from_millis(1),
            Duration::from_secs(u64::MAX),
        ] {
            let e = ttl_of("set_nx", over).unwrap_err().to_string();
            assert!(e.contains("set_nx") && e.contains("315360000 s"), "{e}");
        }
    }

    /// The settings of a backend whose nodes are all gone: a shard of it
    /// dials nothing.
    fn settings_without_nodes() -> Settings {
        Settings {
            namespace: "test".into(),
            set: "txgate".into(),
            bin: BinName::new(b"v").unwrap(),
            dial_timeout: Duration::from_millis(100),
            op_timeout: Duration::from_millis(50),
            inflight_max: 16,
            conns_per_node: 1,
            reply_gather: Duration::ZERO,
            nodes: Mutex::new(vec![Node {
                id: "A".into(),
                addr: "127.0.0.1:9".parse().unwrap(),
                gone: true,
            }]),
            node_count: AtomicUsize::new(1),
            owner: Mutex::new(Arc::from(vec![u16::MAX; codec::PARTITIONS])),
            owner_gen: AtomicU64::new(0),
            tend_rounds: AtomicU64::new(0),
            replicas_refused: AtomicU64::new(0),
        }
    }

    /// `close` ends the shard's sweep task (which holds the only weak
    /// reference to the settings): until the fix it ran, and would dial
    /// joined nodes, for as long as the closed shard was held.
    #[test]
    fn close_stops_the_sweeper() {
        let backend = AerospikeBackend {
            inner: Arc::new(settings_without_nodes()),
        };
        crate::engine::run_local(async move {
            let shard = backend.shard(0).await.expect("no node to dial");
            glommio::timer::sleep(Duration::from_millis(20)).await;
            assert_eq!(Arc::weak_count(&backend.inner), 1, "the sweeper runs");
            shard.close();
            glommio::timer::sleep(Duration::from_millis(20)).await;
            assert_eq!(
                Arc::weak_count(&backend.inner),
                0,
                "the sweeper still runs after close"
            );
        });
    }

    #[test]
    fn a_gone_node_that_comes_back_at_its_old_address_is_a_join() {
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:3000".parse().unwrap(),
            "127.0.0.1:3001".parse().unwrap(),
        );
        let known = [
            Node {
                id: "A".into(),
                addr: a,
                gone: true,
            },
            Node {
                id: "B".into(),
                addr: b,
                gone: false,
            },
        ];
        // B lists A at its old address again; A answers there. A gone node
        // is not asked for its peers.
        let ask_one = |addr: &SocketAddr, cmds: &[&str]| -> Option<codec::InfoPairs> {
            let reply = match (*addr == a, cmds) {
                (false, ["peers-clear-std"]) => "1,3000,[[A,,[127.0.0.1:3000]]]",
                (true, ["node"]) => "A",
                (true, _) => panic!("a gone node was asked {cmds:?}"),
                _ => return None,
            };
            Some(vec![(cmds[0].to_owned(), reply.to_owned())])
        };
        let ask = |addrs: &[SocketAddr], cmds: &[&str]| -> Vec<Option<codec::InfoPairs>> {
            addrs.iter().map(|addr| ask_one(addr, cmds)).collect()
        };
        let (joined, complete) = discover_joined(&known, &ask);
        assert!(complete);
        assert_eq!(joined.len(), 1);
        assert_eq!(
            (joined[0].id.as_str(), joined[0].addr, joined[0].gone),
            ("A", a, false)
        );
    }

    #[test]
    fn members_are_the_nodes_another_lists_or_the_one_that_answered() {
        let node = |id: &str| Node {
            id: id.into(),
            addr: "127.0.0.1:3000".parse().unwrap(),
            gone: false,
        };
        let nodes = [node("A"), node("B"), node("C")];
        let read =
            |peers: &[&str]| Some((String::new(), peers.iter().map(|p| p.to_string()).collect()));
        // A and B list each other; C left and lists nobody.
        let r = [read(&["B"]), read(&["A"]), read(&[])];
        assert_eq!(members(&nodes, &r), [true, true, false]);
        // B was not read: A is then listed by nobody who answered, but it is
        // the only one left besides C, which lists nobody either.
        let r = [read(&["B"]), None, read(&[])];
        assert_eq!(members(&nodes, &r), [false, false, false]);
        // One node answered: it is the cluster.
        let r = [read(&[]), None, None];
        assert_eq!(members(&nodes, &r), [true, false, false]);
    }
}
