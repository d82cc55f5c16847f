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

pub mod resp;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::net::TcpStream;

use super::{CacheError, Config};
use crate::pipeline::{CallError, Connector, Pipeline, PipelineConfig, Protocol};
use resp::{Reply, decode_reply, encode_command};

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
    password: Option<String>,
    db: u32,
    client_name: String,
    dial_timeout: Duration,
    op_timeout: Duration,
    inflight_max: usize,
    info: ServerInfo,
}

impl RedisBackend {
    /// What the server reported at open.
    pub fn info(&self) -> &ServerInfo {
        &self.inner.info
    }

    /// Dials shard `shard`'s connection (handshake included).
    pub async fn shard(&self, shard: usize) -> Result<RedisShard, CacheError> {
        let s = &self.inner;
        let connector = RedisConnector {
            settings: s.clone(),
            name: format!("{}-s{shard}", s.client_name),
        };
        let pipeline = Pipeline::<Resp>::connect(
            connector,
            PipelineConfig {
                inflight_max: s.inflight_max,
                op_timeout: s.op_timeout,
                ..PipelineConfig::default()
            },
        )
        .await
        .map_err(|detail| CacheError::Connect {
            addr: s.addr_text.clone(),
            detail,
        })?;
        let pipeline = Rc::new(pipeline);
        let sweep_every =
            (s.op_timeout / 10).clamp(Duration::from_millis(1), Duration::from_millis(10));
        let swept = Rc::downgrade(&pipeline);
        let sweeper = glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(sweep_every).await;
                let Some(p) = swept.upgrade() else { return };
                p.sweep(Instant::now());
            }
        });
        Ok(RedisShard {
            pipeline,
            _sweeper: sweeper,
            settings: s.clone(),
        })
    }
}

struct RedisConnector {
    settings: Arc<Settings>,
    name: String,
}

impl Connector for RedisConnector {
    type Stream = TcpStream;

    async fn connect(&self) -> Result<TcpStream, String> {
        let s = &self.settings;
        let deadline = s.dial_timeout;
        let work = async {
            let mut stream = TcpStream::connect_timeout(s.addr, deadline)
                .await
                .map_err(|e| format!("dialing {}: {e}", s.addr_text))?;
            stream
                .set_nodelay(true)
                .map_err(|e| format!("TCP_NODELAY: {e}"))?;
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
                s.addr_text,
                deadline.as_millis()
            )),
        }
    }
}

/// AUTH, SELECT and CLIENT SETNAME as the settings require.
fn handshake_commands(s: &Settings, name: Option<&str>) -> Vec<Vec<Vec<u8>>> {
    let mut cmds = Vec::new();
    match (&s.username, &s.password) {
        (Some(u), Some(p)) => cmds.push(vec![
            b"AUTH".to_vec(),
            u.clone().into_bytes(),
            p.clone().into_bytes(),
        ]),
        (None, Some(p)) => cmds.push(vec![b"AUTH".to_vec(), p.clone().into_bytes()]),
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

async fn roundtrip_async(stream: &mut TcpStream, args: &[&[u8]]) -> Result<Reply, String> {
    use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    encode_command(&mut buf, args);
    stream
        .write_all(&buf)
        .await
        .map_err(|e| format!("write: {e}"))?;
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
    pipeline: Rc<Pipeline<Resp>>,
    _sweeper: glommio::Task<()>,
    settings: Arc<Settings>,
}

fn px(ttl: Duration) -> Option<Vec<u8>> {
    if ttl.is_zero() {
        return None;
    }
    let ms = ttl.as_nanos().div_ceil(1_000_000).max(1);
    Some(itoa::Buffer::new().format(ms).as_bytes().to_vec())
}

fn call_error(op: &'static str, e: CallError, timeout: Duration) -> CacheError {
    match e {
        CallError::Timeout(_) => CacheError::Timeout {
            op,
            after_ms: timeout.as_millis() as u64,
        },
        CallError::Closed => CacheError::Closed,
        other => CacheError::Backend {
            op,
            detail: other.to_string(),
        },
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

impl RedisShard {
    async fn set_cmd(
        &self,
        key: &[u8],
        val: &[u8],
        ttl: Duration,
        nx: bool,
        get: bool,
    ) -> Result<Reply, CallError> {
        let px = px(ttl);
        self.pipeline
            .call(|b| {
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

    /// `SET k v NX [PX ms]`; after an ambiguous failure, one `… NX … GET`
    /// retry where the server supports it.
    pub async fn set_nx(&self, key: &[u8], val: &[u8], ttl: Duration) -> Result<bool, CacheError> {
        let timeout = self.settings.op_timeout;
        match self.set_cmd(key, val, ttl, true, false).await {
            Ok(Reply::Ok) => Ok(true),
            Ok(Reply::Nil) => Ok(false),
            Ok(other) => Err(unexpected("set_nx", other)),
            Err(e) if e.is_ambiguous() && self.settings.info.nx_get => {
                match self.set_cmd(key, val, ttl, true, true).await {
                    // Absent: created now. Our own value: the first attempt won.
                    Ok(Reply::Nil) => Ok(true),
                    Ok(Reply::Bulk(v)) => Ok(v == val),
                    Ok(other) => Err(unexpected("set_nx", other)),
                    Err(e) => Err(call_error("set_nx", e, timeout)),
                }
            }
            Err(e) => Err(call_error("set_nx", e, timeout)),
        }
    }

    /// `SET k v [PX ms]`.
    pub async fn set(&self, key: &[u8], val: &[u8], ttl: Duration) -> Result<(), CacheError> {
        match self.set_cmd(key, val, ttl, false, false).await {
            Ok(Reply::Ok) => Ok(()),
            Ok(other) => Err(unexpected("set", other)),
            Err(e) => Err(call_error("set", e, self.settings.op_timeout)),
        }
    }

    /// `GET k`: `None` on a miss.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CacheError> {
        match self
            .pipeline
            .call(|b| encode_command(b, &[b"GET", key]))
            .await
        {
            Ok(Reply::Bulk(v)) => Ok(Some(v)),
            Ok(Reply::Nil) => Ok(None),
            Ok(other) => Err(unexpected("get", other)),
            Err(e) => Err(call_error("get", e, self.settings.op_timeout)),
        }
    }

    /// `DEL k`: 0 or 1 removed, both fine.
    pub async fn del(&self, key: &[u8]) -> Result<(), CacheError> {
        match self
            .pipeline
            .call(|b| encode_command(b, &[b"DEL", key]))
            .await
        {
            Ok(Reply::Int(_)) => Ok(()),
            Ok(other) => Err(unexpected("del", other)),
            Err(e) => Err(call_error("del", e, self.settings.op_timeout)),
        }
    }

    /// `PING` within the dial timeout; cold path.
    pub async fn healthy(&self) -> bool {
        let ping = self.pipeline.call(|b| encode_command(b, &[b"PING"]));
        let bounded = glommio::timer::timeout(self.settings.dial_timeout, async { Ok(ping.await) });
        matches!(bounded.await, Ok(Ok(Reply::Simple(_))))
    }

    /// The connection's counters.
    pub fn counters(&self) -> crate::pipeline::PipelineCounters {
        self.pipeline.counters()
    }

    /// Fails everything in flight and stops reconnecting.
    pub fn close(&self) {
        self.pipeline.close();
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
    let addr = addr_text
        .to_socket_addrs()
        .map_err(|e| CacheError::Connect {
            addr: addr_text.clone(),
            detail: format!("cannot resolve: {e}"),
        })?
        .next()
        .ok_or_else(|| CacheError::Connect {
            addr: addr_text.clone(),
            detail: "resolves to no address".into(),
        })?;
    let mut settings = Settings {
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
    settings.info = verify(&settings)?;
    Ok(RedisBackend {
        inner: Arc::new(settings),
    })
}

fn verify(s: &Settings) -> Result<ServerInfo, CacheError> {
    let addr = s.addr_text.clone();
    let deadline = Instant::now() + s.dial_timeout;
    let timed_out = || CacheError::DialTimeout {
        addr: addr.clone(),
        after_ms: s.dial_timeout.as_millis() as u64,
    };
    let mut stream =
        StdTcpStream::connect_timeout(&s.addr, s.dial_timeout).map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => CacheError::Refused { addr: addr.clone() },
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => timed_out(),
            _ => CacheError::Connect {
                addr: addr.clone(),
                detail: e.to_string(),
            },
        })?;
    let mut ask = |args: &[&[u8]]| -> Result<Reply, CacheError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => timed_out(),
            _ => CacheError::Connect {
                addr: addr.clone(),
                detail: e.to_string(),
            },
        };
        stream.set_read_timeout(Some(left)).map_err(io)?;
        stream.set_write_timeout(Some(left)).map_err(io)?;
        let mut buf = Vec::new();
        encode_command(&mut buf, args);
        stream.write_all(&buf).map_err(io)?;
        let mut rbuf = Vec::new();
        let mut chunk = [0u8; 4096];
        while rbuf.len() < 4 << 20 {
            if Instant::now() >= deadline {
                return Err(timed_out());
            }
            let n = stream.read(&mut chunk).map_err(io)?;
            if n == 0 {
                return Err(CacheError::Connect {
                    addr: addr.clone(),
                    detail: "closed the connection".into(),
                });
            }
            rbuf.extend_from_slice(&chunk[..n]);
            match decode_reply(&rbuf) {
                Ok(Some((r, _))) => return Ok(r),
                Ok(None) => {}
                Err(_) => {
                    return Err(CacheError::NotRedis {
                        addr: addr.clone(),
                        got: String::from_utf8_lossy(&rbuf[..rbuf.len().min(40)]).into_owned(),
                    });
                }
            }
        }
        Err(CacheError::NotRedis {
            addr: addr.clone(),
            got: "an endless reply".into(),
        })
    };
    for cmd in handshake_commands(s, None) {
        let args: Vec<&[u8]> = cmd.iter().map(|a| a.as_slice()).collect();
        match ask(&args)? {
            Reply::Error(e) if cmd[0] == b"AUTH" => {
                return Err(CacheError::Auth {
                    addr: addr.clone(),
                    detail: e,
                });
            }
            Reply::Error(e) => {
                return Err(CacheError::Connect {
                    addr: addr.clone(),
                    detail: format!("{} refused: {e}", String::from_utf8_lossy(&cmd[0])),
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
        other => {
            return Err(CacheError::NotRedis {
                addr: addr.clone(),
                got: format!("{other:?} to PING"),
            });
        }
    }
    let info = |section: &[u8], reply: Reply| -> Vec<u8> {
        let _ = section;
        match reply {
            Reply::Bulk(b) => b,
            _ => Vec::new(),
        }
    };
    let server = info(b"server", ask(&[b"INFO", b"server"])?);
    let cluster = info(b"cluster", ask(&[b"INFO", b"cluster"])?);
    let version = info_field(&server, "redis_version")
        .and_then(parse_version)
        .unwrap_or((0, 0, 0));
    Ok(ServerInfo {
        version,
        nx_get: version >= (7, 0, 0),
        cluster: info_field(&cluster, "cluster_enabled") == Some("1"),
    })
}

fn info_field<'a>(info: &'a [u8], field: &str) -> Option<&'a str> {
    std::str::from_utf8(info).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == field).then(|| v.trim())
    })
}

fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        it.next()??,
        it.next().flatten().unwrap_or(0),
        it.next().flatten().unwrap_or(0),
    ))
}
