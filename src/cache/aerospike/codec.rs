//! The Aerospike wire protocol, sans I/O: record digests and partition ids,
//! AS_MSG requests composed into a caller's buffer, AS_MSG replies parsed
//! from bytes, and the info protocol with the two tending values the client
//! needs (`replicas`, `peers-clear-std`).
//!
//! Everything here is a pure function of its inputs (no sockets, no clocks),
//! so every byte is unit-tested and the parsers are fuzzed directly
//! (`fuzz/fuzz_targets/aerospike_reply.rs`). Replies come from the network:
//! parsers return a [`CodecError`] for any malformed input, never panic, and
//! allocate in proportion to the input (plus fixed tables: a partition map is
//! always 4096 entries), never to a length the input merely claims.
//!
//! Frame layout (big-endian): an 8-byte proto header (version 2, type, 48-bit
//! body length), then for AS_MSG a 22-byte message header, fields
//! (namespace, set, digest) and ops (bins).

use std::fmt;

use base64::Engine as _;
use ripemd::{Digest as _, Ripemd160};

/// Proto version byte of every frame.
pub const PROTO_VERSION: u8 = 2;
/// Proto type of info requests and replies.
pub const PROTO_TYPE_INFO: u8 = 1;
/// Proto type of record requests and replies.
pub const PROTO_TYPE_MSG: u8 = 3;
/// Proto type of a compressed AS_MSG; we never ask for compression.
pub const PROTO_TYPE_COMPRESSED: u8 = 4;
/// Bytes of the proto header before every body.
pub const PROTO_HEADER_LEN: usize = 8;
/// The AS_MSG header size, sent and checked in its first byte.
pub const MSG_HEADER_LEN: usize = 22;
/// Largest body accepted either way: the server's own limit (128 MiB).
pub const PROTO_BODY_MAX: usize = 128 << 20;
/// Longest bin name the server accepts.
pub const BIN_NAME_MAX: usize = 15;
/// Length of a record digest (RIPEMD-160).
pub const DIGEST_LEN: usize = 20;
/// Number of partitions of every namespace.
pub const PARTITIONS: usize = 4096;
/// Bytes of one partition bitmap in a `replicas` value (one bit each).
pub const PARTITION_BITMAP_LEN: usize = PARTITIONS / 8;
/// Most peers accepted from one `peers-clear-std` value.
pub const PEERS_MAX: usize = 256;
/// Most addresses accepted for one peer.
pub const PEER_ADDRS_MAX: usize = 64;

/// Particle (value) types used here.
pub const PARTICLE_NULL: u8 = 0;
pub const PARTICLE_INTEGER: u8 = 1;
pub const PARTICLE_STRING: u8 = 3;
pub const PARTICLE_BLOB: u8 = 4;

const INFO1_READ: u8 = 0x01;
const INFO2_WRITE: u8 = 0x01;
const INFO2_DELETE: u8 = 0x02;
const INFO2_CREATE_ONLY: u8 = 0x20;
const INFO3_CREATE_OR_REPLACE: u8 = 0x10;

const FIELD_NAMESPACE: u8 = 0;
const FIELD_SET: u8 = 1;
const FIELD_DIGEST: u8 = 4;
/// `u32 size | u8 type` before each field's data.
const FIELD_HEADER_LEN: usize = 5;

const OP_READ: u8 = 1;
const OP_WRITE: u8 = 2;
/// `u32 size | op | particle | 0 | name len` before each op's name.
const OP_HEADER_LEN: usize = 8;

/// Record TTL slot: the record never expires.
const TTL_NEVER_EXPIRE: u32 = 0xFFFF_FFFF;
/// Record TTL slot: keep the record's current TTL (reserved; never sent).
const TTL_DONT_UPDATE: u32 = 0xFFFF_FFFE;
/// Longest record TTL a server takes (10 years): a namespace's `max-ttl`
/// cannot be set higher, and a write asking more is refused (PARAMETER).
pub const TTL_MAX_S: u32 = 10 * 365 * 24 * 3600;
/// TTL slot of a read: touch percentage "never", so a get never extends a
/// record's life.
const READ_TOUCH_NEVER: u32 = 0xFFFF_FFFF;

/// Everything that can be wrong with an input of this codec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("bin name of {len} bytes is longer than {BIN_NAME_MAX}")]
    BinName { len: usize },
    #[error(
        "record ttl of {ttl_s} s cannot be sent: 0 means the namespace default and \
         {TTL_DONT_UPDATE:#x}.. are reserved"
    )]
    Ttl { ttl_s: u32 },
    #[error("request body of {len} bytes is over the {PROTO_BODY_MAX}-byte limit")]
    RequestTooLarge { len: usize },
    #[error("not an Aerospike frame: proto version {got} (want {PROTO_VERSION})")]
    ProtoVersion { got: u8 },
    #[error("proto type {got} where {want} was expected")]
    ProtoType { got: u8, want: u8 },
    #[error("compressed reply (proto type {PROTO_TYPE_COMPRESSED}) though none was asked for")]
    Compressed,
    #[error("proto body length {len} is over the {PROTO_BODY_MAX}-byte limit")]
    ProtoLength { len: u64 },
    #[error("AS_MSG body of {len} bytes is shorter than its {MSG_HEADER_LEN}-byte header")]
    BodyTooShort { len: usize },
    #[error("AS_MSG header size {got} (want {MSG_HEADER_LEN})")]
    HeaderSize { got: u8 },
    #[error("field {index}: size {size} does not fit the {left} body bytes left")]
    Field {
        index: usize,
        size: u64,
        left: usize,
    },
    #[error("{n_ops} ops cannot fit the {left} body bytes left")]
    OpCount { n_ops: usize, left: usize },
    #[error("op {index}: size {size} does not fit the {left} body bytes left")]
    Op {
        index: usize,
        size: u64,
        left: usize,
    },
    #[error("op {index}: bin name of {len} bytes does not fit its op of {size} bytes")]
    OpName { index: usize, len: usize, size: u64 },
    #[error("{extra} bytes after the last op of an AS_MSG body")]
    Trailing { extra: usize },
    #[error("info reply is not UTF-8 (at byte {at})")]
    InfoUtf8 { at: usize },
    #[error("replicas for namespace {namespace}: {reason}")]
    Replicas {
        namespace: String,
        reason: &'static str,
    },
    #[error("peers-clear-std value at byte {at}: {reason}")]
    Peers { at: usize, reason: &'static str },
}

/// A server result code, named where the backend acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResultCode(pub u8);

impl ResultCode {
    pub const OK: Self = Self(0);
    /// A get or delete found no live record: a miss, not a failure.
    pub const NOT_FOUND: Self = Self(2);
    /// The request was malformed (also: a TTL over 10 years, a write without ops).
    pub const PARAMETER: Self = Self(4);
    /// A create-only write found a live record (the clients' KEY_EXISTS_ERROR).
    pub const RECORD_EXISTS: Self = Self(5);
    /// The server's transaction deadline passed.
    pub const TIMEOUT: Self = Self(9);
    /// The partition cannot take the transaction now (e.g. a cluster still
    /// forming).
    pub const UNAVAILABLE: Self = Self(11);
    /// The record is over the namespace's `max-record-size` (default and
    /// ceiling 1 MiB).
    pub const RECORD_TOO_BIG: Self = Self(13);
    /// Too many transactions queued on one hot key.
    pub const KEY_BUSY: Self = Self(14);
    /// Refused by configuration; for a write with a TTL, typically a
    /// namespace with `nsup-period 0` and no `allow-ttl-without-nsup`.
    pub const FORBIDDEN: Self = Self(22);
    /// An Enterprise-only feature asked of Community Edition (e.g. durable delete).
    pub const ENTERPRISE_ONLY: Self = Self(25);

    /// The server's name for a code (`as/include/base/proto.h`), `None` for
    /// codes past the ones a key-value client can meet.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "OK",
            1 => "UNKNOWN",
            2 => "NOT_FOUND",
            3 => "GENERATION",
            4 => "PARAMETER",
            5 => "RECORD_EXISTS",
            6 => "BIN_EXISTS",
            7 => "CLUSTER_KEY_MISMATCH",
            8 => "OUT_OF_SPACE",
            9 => "TIMEOUT",
            11 => "UNAVAILABLE",
            12 => "INCOMPATIBLE_TYPE",
            13 => "RECORD_TOO_BIG",
            14 => "KEY_BUSY",
            16 => "UNSUPPORTED_FEATURE",
            17 => "BIN_NOT_FOUND",
            18 => "DEVICE_OVERLOAD",
            19 => "KEY_MISMATCH",
            20 => "NAMESPACE",
            21 => "BIN_NAME",
            22 => "FORBIDDEN",
            25 => "ENTERPRISE_ONLY",
            26 => "OP_NOT_APPLICABLE",
            27 => "FILTERED_OUT",
            28 => "LOST_CONFLICT",
            32 => "XDR_KEY_BUSY",
            _ => return None,
        })
    }
}

impl fmt::Display for ResultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "result code {}", self.0),
        }
    }
}

/// RIPEMD-160 of set ‖ key particle type ‖ key bytes: the record's identity
/// on the server (the namespace is not hashed). Integer keys are 8 bytes
/// big-endian.
pub fn digest_typed(set: &[u8], particle_type: u8, key: &[u8]) -> [u8; DIGEST_LEN] {
    let mut h = Ripemd160::new();
    h.update(set);
    h.update([particle_type]);
    h.update(key);
    let mut d = [0u8; DIGEST_LEN];
    d.copy_from_slice(&h.finalize());
    d
}

/// The digest of a blob key: how every txgate key is stored.
pub fn digest(set: &[u8], key: &[u8]) -> [u8; DIGEST_LEN] {
    digest_typed(set, PARTICLE_BLOB, key)
}

/// The partition (0..4096) owning a digest: its first 4 bytes little-endian.
pub fn partition_id(digest: &[u8; DIGEST_LEN]) -> u16 {
    let first = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
    (first & (PARTITIONS as u32 - 1)) as u16
}

/// A bin name checked once against the server's 15-byte limit, so composing
/// a request cannot fail on it; `Copy`, no allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BinName {
    len: u8,
    bytes: [u8; BIN_NAME_MAX],
}

impl BinName {
    pub fn new(name: &[u8]) -> Result<Self, CodecError> {
        if name.len() > BIN_NAME_MAX {
            return Err(CodecError::BinName { len: name.len() });
        }
        let mut bytes = [0u8; BIN_NAME_MAX];
        bytes[..name.len()].copy_from_slice(name);
        Ok(Self {
            len: name.len() as u8,
            bytes,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl fmt::Debug for BinName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BinName({:?})", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// A record's lifetime as txgate's contract states it. On the wire 0 means
/// "the namespace default", so "no expiry" has its own arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// Never expire (the contract's ttl 0).
    Never,
    /// Expire after this many whole seconds; at least 1 (round sub-second
    /// TTLs up before calling), below 0xFFFFFFFE. The server refuses more
    /// than 10 years with PARAMETER.
    Seconds(u32),
}

impl Ttl {
    fn wire(self) -> Result<u32, CodecError> {
        match self {
            Self::Never => Ok(TTL_NEVER_EXPIRE),
            Self::Seconds(s) if s == 0 || s >= TTL_DONT_UPDATE => Err(CodecError::Ttl { ttl_s: s }),
            Self::Seconds(s) => Ok(s),
        }
    }
}

/// What a record request does. The fifth backend op, the health probe, is
/// the info command `status` ([`encode_info`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// Create iff absent (CREATE_ONLY): OK when created, RECORD_EXISTS when
    /// a live record is there.
    SetNx {
        ttl: Ttl,
        bin: BinName,
        value: &'a [u8],
    },
    /// Create or replace without reading the old record.
    Set {
        ttl: Ttl,
        bin: BinName,
        value: &'a [u8],
    },
    /// Read one bin; never touches the record's TTL. NOT_FOUND is a miss.
    Get { bin: BinName },
    /// Delete; OK and NOT_FOUND both mean "gone".
    Del,
}

/// One record request. Records are addressed by digest: the user key is
/// not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub namespace: &'a [u8],
    /// The set name; an empty set sends no set field (records outside sets).
    pub set: &'a [u8],
    pub digest: &'a [u8; DIGEST_LEN],
    /// The server's deadline for this transaction, in ms (0 = server default,
    /// 1000 ms): pass what is left of the op's own deadline.
    pub timeout_ms: u32,
    pub op: Op<'a>,
}

/// Appends one AS_MSG request to `out`, reserving once. On error `out` is
/// left as it was.
pub fn encode_request(req: &Request<'_>, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let (info1, info2, info3, ttl_slot) = match req.op {
        Op::SetNx { ttl, .. } => (0, INFO2_WRITE | INFO2_CREATE_ONLY, 0, ttl.wire()?),
        Op::Set { ttl, .. } => (0, INFO2_WRITE, INFO3_CREATE_OR_REPLACE, ttl.wire()?),
        Op::Get { .. } => (INFO1_READ, 0, 0, READ_TOUCH_NEVER),
        // The TTL of a deleted record is moot: 0 leaves it to the server.
        Op::Del => (0, INFO2_WRITE | INFO2_DELETE, 0, 0),
    };
    let n_fields: u16 = if req.set.is_empty() { 2 } else { 3 };
    let fields_len =
        FIELD_HEADER_LEN * n_fields as usize + req.namespace.len() + req.set.len() + DIGEST_LEN;
    let (n_ops, ops_len) = match req.op {
        Op::SetNx { bin, value, .. } | Op::Set { bin, value, .. } => {
            (1u16, OP_HEADER_LEN + bin.as_bytes().len() + value.len())
        }
        Op::Get { bin } => (1, OP_HEADER_LEN + bin.as_bytes().len()),
        Op::Del => (0, 0),
    };
    let body_len = MSG_HEADER_LEN + fields_len + ops_len;
    if body_len > PROTO_BODY_MAX {
        return Err(CodecError::RequestTooLarge { len: body_len });
    }
    out.reserve(PROTO_HEADER_LEN + body_len);
    let start = out.len();
    proto_header(out, PROTO_TYPE_MSG, body_len);
    out.extend_from_slice(&[MSG_HEADER_LEN as u8, info1, info2, info3, 0, 0]);
    out.extend_from_slice(&0u32.to_be_bytes()); // generation
    out.extend_from_slice(&ttl_slot.to_be_bytes());
    out.extend_from_slice(&req.timeout_ms.to_be_bytes());
    out.extend_from_slice(&n_fields.to_be_bytes());
    out.extend_from_slice(&n_ops.to_be_bytes());
    field(out, FIELD_NAMESPACE, req.namespace);
    if !req.set.is_empty() {
        field(out, FIELD_SET, req.set);
    }
    field(out, FIELD_DIGEST, req.digest);
    match req.op {
        Op::SetNx { bin, value, .. } | Op::Set { bin, value, .. } => {
            op(out, OP_WRITE, PARTICLE_BLOB, bin, value)
        }
        Op::Get { bin } => op(out, OP_READ, PARTICLE_NULL, bin, &[]),
        Op::Del => {}
    }
    debug_assert_eq!(out.len() - start, PROTO_HEADER_LEN + body_len);
    Ok(())
}

/// Version, type and 48-bit body length in one big-endian u64.
fn proto_header(out: &mut Vec<u8>, proto_type: u8, body_len: usize) {
    debug_assert!(body_len <= PROTO_BODY_MAX);
    let word = (u64::from(PROTO_VERSION) << 56) | (u64::from(proto_type) << 48) | body_len as u64;
    out.extend_from_slice(&word.to_be_bytes());
}

fn field(out: &mut Vec<u8>, field_type: u8, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32 + 1).to_be_bytes());
    out.push(field_type);
    out.extend_from_slice(data);
}

fn op(out: &mut Vec<u8>, op: u8, particle: u8, bin: BinName, value: &[u8]) {
    let name = bin.as_bytes();
    out.extend_from_slice(&((4 + name.len() + value.len()) as u32).to_be_bytes());
    out.extend_from_slice(&[op, particle, 0, name.len() as u8]);
    out.extend_from_slice(name);
    out.extend_from_slice(value);
}

/// One bin of a read reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bin {
    pub name: BinName,
    pub particle_type: u8,
    pub value: Vec<u8>,
}

/// A parsed AS_MSG reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub result: ResultCode,
    pub generation: u32,
    /// Expiry in seconds since 2010-01-01 UTC; 0 = never.
    pub expiration: u32,
    /// The bins of a read reply; empty otherwise.
    pub bins: Vec<Bin>,
}

impl Reply {
    /// The bin called `name`, if the reply carries it.
    pub fn bin(&self, name: &[u8]) -> Option<&Bin> {
        self.bins.iter().find(|b| b.name.as_bytes() == name)
    }
}

/// Checks the proto header at the front of `buf` as far as it is there and
/// returns the body length once the whole frame is: `Ok(None)` = need more.
/// Bytes are judged as soon as they arrive, so garbage fails early.
fn frame(buf: &[u8], want_type: u8, body_min: usize) -> Result<Option<usize>, CodecError> {
    if let Some(&got) = buf.first()
        && got != PROTO_VERSION
    {
        return Err(CodecError::ProtoVersion { got });
    }
    if let Some(&got) = buf.get(1)
        && got != want_type
    {
        return Err(
            if got == PROTO_TYPE_COMPRESSED && want_type == PROTO_TYPE_MSG {
                CodecError::Compressed
            } else {
                CodecError::ProtoType {
                    got,
                    want: want_type,
                }
            },
        );
    }
    let Some(head) = buf.get(..PROTO_HEADER_LEN) else {
        return Ok(None);
    };
    let len = u64::from_be_bytes([0, 0, head[2], head[3], head[4], head[5], head[6], head[7]]);
    if len > PROTO_BODY_MAX as u64 {
        return Err(CodecError::ProtoLength { len });
    }
    let len = len as usize;
    if len < body_min {
        return Err(CodecError::BodyTooShort { len });
    }
    if buf.len() - PROTO_HEADER_LEN < len {
        return Ok(None);
    }
    Ok(Some(len))
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses one AS_MSG reply from the front of `buf`: the reply and the bytes
/// it used, `Ok(None)` when `buf` holds only part of one.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, CodecError> {
    let Some(len) = frame(buf, PROTO_TYPE_MSG, MSG_HEADER_LEN)? else {
        return Ok(None);
    };
    let body = &buf[PROTO_HEADER_LEN..PROTO_HEADER_LEN + len];
    if body[0] != MSG_HEADER_LEN as u8 {
        return Err(CodecError::HeaderSize { got: body[0] });
    }
    let result = ResultCode(body[5]);
    let generation = be_u32(body, 6);
    let expiration = be_u32(body, 10);
    let n_fields = be_u16(body, 18) as usize;
    let n_ops = be_u16(body, 20) as usize;
    let mut at = MSG_HEADER_LEN;
    // Fields (a digest on some replies) are not needed: skip them, bounded
    // by the body.
    for index in 0..n_fields {
        let left = body.len() - at;
        if left < 4 {
            return Err(CodecError::Field {
                index,
                size: 0,
                left,
            });
        }
        let size = u64::from(be_u32(body, at));
        if size == 0 || size > (left - 4) as u64 {
            return Err(CodecError::Field { index, size, left });
        }
        at += 4 + size as usize;
    }
    let left = body.len() - at;
    if n_ops.saturating_mul(OP_HEADER_LEN) > left {
        return Err(CodecError::OpCount { n_ops, left });
    }
    let mut bins = Vec::with_capacity(n_ops);
    for index in 0..n_ops {
        let left = body.len() - at;
        let size = if left >= OP_HEADER_LEN {
            u64::from(be_u32(body, at))
        } else {
            0
        };
        if left < OP_HEADER_LEN || size < 4 || size > (left - 4) as u64 {
            return Err(CodecError::Op { index, size, left });
        }
        let particle_type = body[at + 5];
        let name_len = body[at + 7] as usize;
        if name_len as u64 > size - 4 {
            return Err(CodecError::OpName {
                index,
                len: name_len,
                size,
            });
        }
        let name_at = at + OP_HEADER_LEN;
        let end = at + 4 + size as usize;
        let name = BinName::new(&body[name_at..name_at + name_len])?;
        bins.push(Bin {
            name,
            particle_type,
            value: body[name_at + name_len..end].to_vec(),
        });
        at = end;
    }
    if at != body.len() {
        return Err(CodecError::Trailing {
            extra: body.len() - at,
        });
    }
    Ok(Some((
        Reply {
            result,
            generation,
            expiration,
            bins,
        },
        PROTO_HEADER_LEN + len,
    )))
}

/// Appends one info request asking `commands` (e.g. `status`, `node`,
/// `replicas`). Commands are fixed names: one holding `\n` would split.
pub fn encode_info(commands: &[&str], out: &mut Vec<u8>) {
    let body_len: usize = commands.iter().map(|c| c.len() + 1).sum();
    debug_assert!(commands.iter().all(|c| !c.contains('\n')));
    out.reserve(PROTO_HEADER_LEN + body_len);
    proto_header(out, PROTO_TYPE_INFO, body_len);
    for c in commands {
        out.extend_from_slice(c.as_bytes());
        out.push(b'\n');
    }
}

/// The `(name, value)` pairs of an info reply, in the server's order.
pub type InfoPairs = Vec<(String, String)>;

/// Parses one info reply: `(name, value)` per `name\tvalue\n` line, in the
/// server's order, and the bytes used; `Ok(None)` = need more. Values may be
/// empty; errors (`ERROR:<code>:<msg>`) stay as the value. A line without a
/// tab is a name with an empty value.
pub fn parse_info_reply(buf: &[u8]) -> Result<Option<(InfoPairs, usize)>, CodecError> {
    let Some(len) = frame(buf, PROTO_TYPE_INFO, 0)? else {
        return Ok(None);
    };
    let body = &buf[PROTO_HEADER_LEN..PROTO_HEADER_LEN + len];
    let text = std::str::from_utf8(body).map_err(|e| CodecError::InfoUtf8 {
        at: e.valid_up_to(),
    })?;
    let pairs = text
        .split('\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, value) = line.split_once('\t').unwrap_or((line, ""));
            (name.to_owned(), value.to_owned())
        })
        .collect();
    Ok(Some((pairs, PROTO_HEADER_LEN + len)))
}

/// From a `replicas` value (`ns:regime,n_replicas,b64,b64…;…`), the
/// partitions this node is master for (the first bitmap); `None` when the
/// namespace is not listed.
pub fn parse_replicas_masters(
    value: &str,
    namespace: &str,
) -> Result<Option<Box<[bool; PARTITIONS]>>, CodecError> {
    let bad = |reason| CodecError::Replicas {
        namespace: namespace.to_owned(),
        reason,
    };
    // Base64 of 512 bytes, padded.
    const B64_LEN: usize = PARTITION_BITMAP_LEN.div_ceil(3) * 4;
    let Some(rest) = value
        .split(';')
        .find_map(|entry| entry.split_once(':').filter(|(ns, _)| *ns == namespace))
        .map(|(_, rest)| rest)
    else {
        return Ok(None);
    };
    let mut parts = rest.split(',');
    parts
        .next()
        .and_then(|r| r.parse::<u32>().ok())
        .ok_or_else(|| bad("regime is not a number"))?;
    let n_replicas = parts
        .next()
        .and_then(|r| r.parse::<usize>().ok())
        .ok_or_else(|| bad("replica count is not a number"))?;
    if n_replicas == 0 {
        return Err(bad("replica count is 0"));
    }
    let bitmaps: Vec<&str> = parts.take(n_replicas + 1).collect();
    if bitmaps.len() != n_replicas {
        return Err(bad("bitmap count differs from the replica count"));
    }
    if bitmaps.iter().any(|b| b.len() != B64_LEN) {
        return Err(bad("a bitmap is not 512 bytes of base64"));
    }
    let mut bytes = [0u8; PARTITION_BITMAP_LEN];
    let n = base64::engine::general_purpose::STANDARD
        .decode_slice(bitmaps[0], &mut bytes)
        .map_err(|_| bad("master bitmap is not valid base64"))?;
    if n != PARTITION_BITMAP_LEN {
        return Err(bad("master bitmap is not 512 bytes of base64"));
    }
    let mut masters = Box::new([false; PARTITIONS]);
    for (p, owned) in masters.iter_mut().enumerate() {
        *owned = bytes[p >> 3] & (0x80 >> (p & 7)) != 0;
    }
    Ok(Some(masters))
}

/// The cluster's other nodes as one node sees them (`peers-clear-std`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers {
    /// Changes whenever the peer list does: refetch only then.
    pub generation: u64,
    pub nodes: Vec<Peer>,
}

/// One peer node: its id and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: String,
    /// `(host, port)`; IPv6 hosts without brackets.
    pub addrs: Vec<(String, u16)>,
}

/// Parses `gen,port,[[id,tls_name,[addr[:port],…]],…]`; `port` applies to
/// addresses without one, IPv6 addresses come in brackets (`[::1]:3000`).
pub fn parse_peers_clear_std(value: &str) -> Result<Peers, CodecError> {
    let mut p = PeerParser {
        s: value.as_bytes(),
        at: 0,
    };
    let generation = p
        .until(b',')?
        .parse::<u64>()
        .map_err(|_| p.err("generation is not a number"))?;
    p.expect(b',')?;
    let port_at = p.at;
    let default_port = match p.until(b',')? {
        "" => None,
        s => Some(
            s.parse::<u16>()
                .map_err(|_| PeerParser::err_at(port_at, "bad default port"))?,
        ),
    };
    p.expect(b',')?;
    p.expect(b'[')?;
    let mut nodes = Vec::new();
    if !p.eat(b']') {
        loop {
            if nodes.len() == PEERS_MAX {
                return Err(p.err("more peers than PEERS_MAX"));
            }
            nodes.push(p.peer(default_port)?);
            if p.eat(b']') {
                break;
            }
            p.expect(b',')?;
        }
    }
    if p.at != p.s.len() {
        return Err(p.err("bytes after the peer list"));
    }
    Ok(Peers { generation, nodes })
}

struct PeerParser<'a> {
    s: &'a [u8],
    at: usize,
}

impl<'a> PeerParser<'a> {
    fn err(&self, reason: &'static str) -> CodecError {
        Self::err_at(self.at, reason)
    }

    fn err_at(at: usize, reason: &'static str) -> CodecError {
        CodecError::Peers { at, reason }
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.s.get(self.at) == Some(&b);
        self.at += usize::from(hit);
        hit
    }

    fn expect(&mut self, b: u8) -> Result<(), CodecError> {
        if self.eat(b) {
            Ok(())
        } else {
            Err(self.err(match b {
                b',' => "expected ','",
                b'[' => "expected '['",
                b']' => "expected ']'",
                _ => "unexpected byte",
            }))
        }
    }

    /// The text up to (not including) the next byte in `stops`, or the end.
    fn until_any(&mut self, stops: &[u8]) -> Result<&'a str, CodecError> {
        let start = self.at;
        while self.at < self.s.len() && !stops.contains(&self.s[self.at]) {
            self.at += 1;
        }
        // Splits happen only at ASCII bytes of a &str: always a char boundary.
        std::str::from_utf8(&self.s[start..self.at]).map_err(|_| Self::err_at(start, "not UTF-8"))
    }

    fn until(&mut self, stop: u8) -> Result<&'a str, CodecError> {
        self.until_any(&[stop])
    }

    fn peer(&mut self, default_port: Option<u16>) -> Result<Peer, CodecError> {
        self.expect(b'[')?;
        let id = self.until_any(b",[]")?;
        if id.is_empty() {
            return Err(self.err("empty node id"));
        }
        self.expect(b',')?;
        self.until_any(b",[]")?; // TLS name: unused by the clear-text client
        self.expect(b',')?;
        self.expect(b'[')?;
        let mut addrs = Vec::new();
        if !self.eat(b']') {
            loop {
                if addrs.len() == PEER_ADDRS_MAX {
                    return Err(self.err("more addresses than PEER_ADDRS_MAX"));
                }
                addrs.push(self.addr(default_port)?);
                if self.eat(b']') {
                    break;
                }
                self.expect(b',')?;
            }
        }
        self.expect(b']')?;
        Ok(Peer {
            id: id.to_owned(),
            addrs,
        })
    }

    fn addr(&mut self, default_port: Option<u16>) -> Result<(String, u16), CodecError> {
        let start = self.at;
        let host = if self.eat(b'[') {
            let h = self.until_any(b"[],")?;
            self.expect(b']')?;
            h
        } else {
            let h = self.until_any(b":,[]")?;
            if h.contains(':') {
                return Err(Self::err_at(start, "IPv6 address without brackets"));
            }
            h
        };
        if host.is_empty() {
            return Err(Self::err_at(start, "empty address"));
        }
        let port = if self.eat(b':') {
            let port_at = self.at;
            self.until_any(b",]")?
                .parse::<u16>()
                .map_err(|_| Self::err_at(port_at, "bad port"))?
        } else {
            default_port.ok_or_else(|| Self::err_at(start, "no port and no default port"))?
        };
        Ok((host.to_owned(), port))
    }
}

// ---------------------------------------------------------------------------
// Server side (for the protocol-level test server): requests parsed, replies
// composed. Same rules as the client side: bounded by the input, no panics.
// ---------------------------------------------------------------------------

/// Field type of the user key (`particle type ‖ key bytes`); optional on the
/// wire, never sent by txgate.
pub const FIELD_KEY: u8 = 2;
/// Record TTL slot of a request: never expire.
pub const REQUEST_TTL_NEVER: u32 = TTL_NEVER_EXPIRE;
/// Record TTL slot of a request: keep the record's current TTL.
pub const REQUEST_TTL_KEEP: u32 = TTL_DONT_UPDATE;

/// One op of a parsed request: `op` 1 = READ, 2 = WRITE (others kept as sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedOp {
    pub op: u8,
    pub particle_type: u8,
    pub name: BinName,
    pub value: Vec<u8>,
}

/// One AS_MSG request as a server reads it. Fields are kept raw (their data
/// without the type byte): judging them (a digest of the wrong length, an
/// unknown namespace) is the server's business, answered with a result code.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedRequest {
    pub info1: u8,
    pub info2: u8,
    pub info3: u8,
    pub generation: u32,
    /// Record TTL slot: 0 = namespace default, [`REQUEST_TTL_NEVER`],
    /// [`REQUEST_TTL_KEEP`], else seconds; the read-touch percentage on reads.
    pub record_ttl: u32,
    /// Transaction TTL in ms (0 = server default).
    pub timeout_ms: u32,
    pub namespace: Option<Vec<u8>>,
    pub set: Option<Vec<u8>>,
    /// The digest field's data; 20 bytes when well formed.
    pub digest: Option<Vec<u8>>,
    /// The key field's data: particle type byte, then the key.
    pub key: Option<Vec<u8>>,
    pub ops: Vec<ParsedOp>,
}

impl ParsedRequest {
    /// info1 READ.
    pub fn is_read(&self) -> bool {
        self.info1 & INFO1_READ != 0
    }

    /// info1 GET_ALL.
    pub fn is_get_all(&self) -> bool {
        self.info1 & INFO1_GET_ALL != 0
    }

    /// info1 GET_NO_BINS.
    pub fn is_get_no_bins(&self) -> bool {
        self.info1 & INFO1_GET_NO_BINS != 0
    }

    /// info2 WRITE.
    pub fn is_write(&self) -> bool {
        self.info2 & INFO2_WRITE != 0
    }

    /// info2 DELETE.
    pub fn is_delete(&self) -> bool {
        self.info2 & INFO2_DELETE != 0
    }

    /// info2 CREATE_ONLY.
    pub fn is_create_only(&self) -> bool {
        self.info2 & INFO2_CREATE_ONLY != 0
    }

    /// info3 CREATE_OR_REPLACE.
    pub fn is_create_or_replace(&self) -> bool {
        self.info3 & INFO3_CREATE_OR_REPLACE != 0
    }

    /// info3 UPDATE_ONLY.
    pub fn is_update_only(&self) -> bool {
        self.info3 & INFO3_UPDATE_ONLY != 0
    }

    /// info3 REPLACE_ONLY.
    pub fn is_replace_only(&self) -> bool {
        self.info3 & INFO3_REPLACE_ONLY != 0
    }

    /// The digest when it is exactly [`DIGEST_LEN`] bytes.
    pub fn digest(&self) -> Option<[u8; DIGEST_LEN]> {
        self.digest.as_deref().and_then(|d| d.try_into().ok())
    }
}

const INFO1_GET_ALL: u8 = 0x02;
const INFO1_GET_NO_BINS: u8 = 0x20;
const INFO3_UPDATE_ONLY: u8 = 0x08;
const INFO3_REPLACE_ONLY: u8 = 0x20;

/// Parses one AS_MSG request from the front of `buf` (what a server reads):
/// the request and the bytes it used, `Ok(None)` when `buf` holds only part
/// of one.
pub fn parse_request(buf: &[u8]) -> Result<Option<(ParsedRequest, usize)>, CodecError> {
    let Some(len) = frame(buf, PROTO_TYPE_MSG, MSG_HEADER_LEN)? else {
        return Ok(None);
    };
    let body = &buf[PROTO_HEADER_LEN..PROTO_HEADER_LEN + len];
    if body[0] != MSG_HEADER_LEN as u8 {
        return Err(CodecError::HeaderSize { got: body[0] });
    }
    let mut req = ParsedRequest {
        info1: body[1],
        info2: body[2],
        info3: body[3],
        generation: be_u32(body, 6),
        record_ttl: be_u32(body, 10),
        timeout_ms: be_u32(body, 14),
        ..ParsedRequest::default()
    };
    let n_fields = be_u16(body, 18) as usize;
    let n_ops = be_u16(body, 20) as usize;
    let mut at = MSG_HEADER_LEN;
    for index in 0..n_fields {
        let left = body.len() - at;
        if left < FIELD_HEADER_LEN {
            return Err(CodecError::Field {
                index,
                size: if left >= 4 {
                    u64::from(be_u32(body, at))
                } else {
                    0
                },
                left,
            });
        }
        let size = u64::from(be_u32(body, at));
        if size == 0 || size > (left - 4) as u64 {
            return Err(CodecError::Field { index, size, left });
        }
        let data = body[at + FIELD_HEADER_LEN..at + 4 + size as usize].to_vec();
        match body[at + 4] {
            FIELD_NAMESPACE => req.namespace = Some(data),
            FIELD_SET => req.set = Some(data),
            FIELD_KEY => req.key = Some(data),
            FIELD_DIGEST => req.digest = Some(data),
            _ => {} // other fields (filters, policies) are skipped
        }
        at += 4 + size as usize;
    }
    let left = body.len() - at;
    if n_ops.saturating_mul(OP_HEADER_LEN) > left {
        return Err(CodecError::OpCount { n_ops, left });
    }
    req.ops.reserve_exact(n_ops);
    for index in 0..n_ops {
        let left = body.len() - at;
        let size = if left >= OP_HEADER_LEN {
            u64::from(be_u32(body, at))
        } else {
            0
        };
        if left < OP_HEADER_LEN || size < 4 || size > (left - 4) as u64 {
            return Err(CodecError::Op { index, size, left });
        }
        let name_len = body[at + 7] as usize;
        if name_len as u64 > size - 4 {
            return Err(CodecError::OpName {
                index,
                len: name_len,
                size,
            });
        }
        let name_at = at + OP_HEADER_LEN;
        let end = at + 4 + size as usize;
        req.ops.push(ParsedOp {
            op: body[at + 4],
            particle_type: body[at + 5],
            name: BinName::new(&body[name_at..name_at + name_len])?,
            value: body[name_at + name_len..end].to_vec(),
        });
        at = end;
    }
    if at != body.len() {
        return Err(CodecError::Trailing {
            extra: body.len() - at,
        });
    }
    Ok(Some((req, PROTO_HEADER_LEN + len)))
}

/// Appends one AS_MSG reply (what a server writes): header, no fields, one
/// READ op per bin. `expiration` is seconds since 2010-01-01 UTC (0 =
/// never). On error (a bin name over 15 bytes, a body over the limit) `out`
/// is left as it was.
pub fn encode_reply(
    out: &mut Vec<u8>,
    result: ResultCode,
    generation: u32,
    expiration: u32,
    bins: &[(&[u8], u8, &[u8])],
) -> Result<(), CodecError> {
    let mut body_len = MSG_HEADER_LEN;
    for (name, _, value) in bins {
        if name.len() > BIN_NAME_MAX {
            return Err(CodecError::BinName { len: name.len() });
        }
        body_len = body_len.saturating_add(OP_HEADER_LEN + name.len() + value.len());
    }
    if body_len > PROTO_BODY_MAX || bins.len() > usize::from(u16::MAX) {
        return Err(CodecError::RequestTooLarge { len: body_len });
    }
    out.reserve(PROTO_HEADER_LEN + body_len);
    proto_header(out, PROTO_TYPE_MSG, body_len);
    out.extend_from_slice(&[MSG_HEADER_LEN as u8, 0, 0, 0, 0, result.0]);
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(&expiration.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes()); // transaction ttl: unused in replies
    out.extend_from_slice(&0u16.to_be_bytes()); // n_fields
    out.extend_from_slice(&(bins.len() as u16).to_be_bytes());
    for (name, particle, value) in bins {
        out.extend_from_slice(&((4 + name.len() + value.len()) as u32).to_be_bytes());
        out.extend_from_slice(&[OP_READ, *particle, 0, name.len() as u8]);
        out.extend_from_slice(name);
        out.extend_from_slice(value);
    }
    Ok(())
}

/// Parses one info request (proto type 1): the commands, each ended by `\n`
/// (a last one without `\n` is ignored, as the server does; empty lines are
/// skipped), and the bytes used; `Ok(None)` = need more.
pub fn parse_info_request(buf: &[u8]) -> Result<Option<(Vec<String>, usize)>, CodecError> {
    let Some(len) = frame(buf, PROTO_TYPE_INFO, 0)? else {
        return Ok(None);
    };
    let body = &buf[PROTO_HEADER_LEN..PROTO_HEADER_LEN + len];
    let text = std::str::from_utf8(body).map_err(|e| CodecError::InfoUtf8 {
        at: e.valid_up_to(),
    })?;
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    let commands = complete
        .split('\n')
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(Some((commands, PROTO_HEADER_LEN + len)))
}

/// Appends one info reply: `name\tvalue\n` per pair. Names and values must
/// hold no `\n` (nor a tab in the name); the body must stay under
/// [`PROTO_BODY_MAX`] (both debug-asserted: the server writes them).
pub fn encode_info_reply(out: &mut Vec<u8>, pairs: &[(&str, &str)]) {
    let body_len: usize = pairs.iter().map(|(n, v)| n.len() + v.len() + 2).sum();
    debug_assert!(body_len <= PROTO_BODY_MAX);
    debug_assert!(
        pairs
            .iter()
            .all(|(n, v)| !n.contains(['\n', '\t']) && !v.contains('\n'))
    );
    out.reserve(PROTO_HEADER_LEN + body_len);
    proto_header(out, PROTO_TYPE_INFO, body_len);
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.push(b'\t');
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// xorshift64*: deterministic, dependency-free randomness for tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn digests_and_partitions_match_the_server() {
        let cases: &[(u8, &[u8], &str, u16)] = &[
            (
                PARTICLE_BLOB,
                b"aaaaaaaaaa",
                "d10982327b2b04c7360579f252e164a75f83cd99",
                2513,
            ),
            (
                PARTICLE_BLOB,
                b"",
                "327e2877b8815c7aeede0d5a8620d4ef8df4a4b4",
                3634,
            ),
            (
                PARTICLE_STRING,
                b"haha",
                "36eb02a807dbade8cd784e7800d76308b4e89212",
                2870,
            ),
            (
                PARTICLE_INTEGER,
                &0u64.to_be_bytes(),
                "93d943aae37b017ad7e011b0c1d2e2143c2fb37d",
                2451,
            ),
        ];
        for &(ptype, key, want, pid) in cases {
            let d = digest_typed(b"set", ptype, key);
            assert_eq!(hex(&d), want, "type {ptype} key {key:?}");
            assert_eq!(partition_id(&d), pid, "type {ptype} key {key:?}");
        }
        assert_eq!(
            digest(b"set", b"aaaaaaaaaa"),
            digest_typed(b"set", 4, b"aaaaaaaaaa")
        );
    }

    #[test]
    fn partition_id_is_the_low_12_bits_of_the_first_word_little_endian() {
        let mut d = [0u8; 20];
        d[..4].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(partition_id(&d), 4095);
        d[..4].copy_from_slice(&[0x01, 0x10, 0xFF, 0xFF]);
        assert_eq!(partition_id(&d), 0x001);
        d[..4].copy_from_slice(&[0x00, 0x01, 0, 0]);
        assert_eq!(partition_id(&d), 256);
    }

    #[test]
    fn bin_names_longer_than_15_bytes_are_refused() {
        assert_eq!(BinName::new(b"").unwrap().as_bytes(), b"");
        assert_eq!(BinName::new(&[b'x'; 15]).unwrap().as_bytes(), [b'x'; 15]);
        assert_eq!(
            BinName::new(&[b'x'; 16]),
            Err(CodecError::BinName { len: 16 })
        );
    }

    const DIGEST: [u8; 20] = [
        0xd1, 0x09, 0x82, 0x32, 0x7b, 0x2b, 0x04, 0xc7, 0x36, 0x05, 0x79, 0xf2, 0x52, 0xe1, 0x64,
        0xa7, 0x5f, 0x83, 0xcd, 0x99,
    ];

    fn request(op: Op<'_>) -> Vec<u8> {
        let req = Request {
            namespace: b"test",
            set: b"set",
            digest: &DIGEST,
            timeout_ms: 50,
            op,
        };
        let mut out = b"prior".to_vec();
        encode_request(&req, &mut out).unwrap();
        assert_eq!(&out[..5], b"prior", "appends");
        out.split_off(5)
    }

    /// namespace "test" (9) + set "set" (8) + digest (25).
    const FIELDS_LEN: usize = 42;

    fn fields() -> Vec<u8> {
        let mut f = vec![0, 0, 0, 5, 0];
        f.extend_from_slice(b"test");
        f.extend_from_slice(&[0, 0, 0, 4, 1]);
        f.extend_from_slice(b"set");
        f.extend_from_slice(&[0, 0, 0, 21, 4]);
        f.extend_from_slice(&DIGEST);
        assert_eq!(f.len(), FIELDS_LEN);
        f
    }

    #[test]
    fn set_nx_request_bytes() {
        let bin = BinName::new(b"v").unwrap();
        let got = request(Op::SetNx {
            ttl: Ttl::Seconds(60),
            bin,
            value: b"hello",
        });
        // Body: 22 header + 42 fields + 14 op (8 + "v" + "hello") = 78.
        let mut want = vec![
            2, 3, 0, 0, 0, 0, 0, 78, // proto: version 2, type 3, length
            22, 0, 0x21, 0, 0, 0, // header size, info1..4 (WRITE|CREATE_ONLY), result
            0, 0, 0, 0, // generation
            0, 0, 0, 60, // record ttl
            0, 0, 0, 50, // transaction ttl (ms)
            0, 3, 0, 1, // n_fields, n_ops
        ];
        want.extend_from_slice(&fields());
        want.extend_from_slice(&[0, 0, 0, 10, 2, 4, 0, 1, b'v']); // WRITE, blob, "v"
        want.extend_from_slice(b"hello");
        assert_eq!(got, want);
    }

    #[test]
    fn set_request_bytes_with_no_expiry() {
        let bin = BinName::new(b"v").unwrap();
        let got = request(Op::Set {
            ttl: Ttl::Never,
            bin,
            value: b"",
        });
        // Body: 22 + 42 + 9 = 73.
        let head = [
            2, 3, 0, 0, 0, 0, 0, 73, 22, 0, 0x01, 0x10, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
            0, 0, 0, 50, 0, 3, 0, 1,
        ];
        assert_eq!(got[..30], head);
        assert_eq!(got[30..72], fields());
        assert_eq!(got[72..], [0, 0, 0, 5, 2, 4, 0, 1, b'v']);
    }

    #[test]
    fn get_request_bytes_never_touch_the_ttl() {
        let bin = BinName::new(b"val").unwrap();
        let got = request(Op::Get { bin });
        // Body: 22 + 42 + 11 = 75.
        let head = [
            2, 3, 0, 0, 0, 0, 0, 75, 22, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0,
            0, 0, 50, 0, 3, 0, 1,
        ];
        assert_eq!(got[..30], head);
        assert_eq!(got[30..72], fields());
        assert_eq!(got[72..], [0, 0, 0, 7, 1, 0, 0, 3, b'v', b'a', b'l']);
    }

    #[test]
    fn del_request_bytes_have_no_ops() {
        let got = request(Op::Del);
        // Body: 22 + 42 = 64.
        let head = [
            2, 3, 0, 0, 0, 0, 0, 64, 22, 0, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 50, 0,
            3, 0, 0,
        ];
        assert_eq!(got[..30], head);
        assert_eq!(got[30..], fields());
    }

    #[test]
    fn empty_set_sends_no_set_field() {
        let req = Request {
            namespace: b"ns",
            set: b"",
            digest: &DIGEST,
            timeout_ms: 0,
            op: Op::Del,
        };
        let mut out = Vec::new();
        encode_request(&req, &mut out).unwrap();
        assert_eq!(out[7], 22 + 7 + 25);
        assert_eq!(out[26..30], [0, 2, 0, 0]);
        assert_eq!(out[30..37], [0, 0, 0, 3, 0, b'n', b's']);
        assert_eq!(out[37..42], [0, 0, 0, 21, 4]);
    }

    #[test]
    fn unsendable_ttls_and_sizes_leave_the_buffer_alone() {
        let bin = BinName::new(b"v").unwrap();
        let big = vec![0u8; PROTO_BODY_MAX];
        for (ttl, value, want) in [
            (Ttl::Seconds(0), &b"x"[..], CodecError::Ttl { ttl_s: 0 }),
            (
                Ttl::Seconds(0xFFFF_FFFE),
                &b"x"[..],
                CodecError::Ttl { ttl_s: 0xFFFF_FFFE },
            ),
            (
                Ttl::Seconds(1),
                &big[..],
                CodecError::RequestTooLarge {
                    len: 22 + FIELDS_LEN + 9 + PROTO_BODY_MAX,
                },
            ),
        ] {
            let mut out = b"keep".to_vec();
            let req = Request {
                namespace: b"test",
                set: b"set",
                digest: &DIGEST,
                timeout_ms: 50,
                op: Op::SetNx { ttl, bin, value },
            };
            assert_eq!(encode_request(&req, &mut out), Err(want));
            assert_eq!(out, b"keep");
        }
    }

    /// A reply as the server writes it: header, optional fields, bins.
    fn reply_bytes(result: u8, fields: &[&[u8]], bins: &[(&[u8], u8, &[u8])]) -> Vec<u8> {
        let mut body = vec![22, 0, 0, 0, 0, result];
        body.extend_from_slice(&7u32.to_be_bytes()); // generation
        body.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // expiration
        body.extend_from_slice(&0u32.to_be_bytes());
        body.extend_from_slice(&(fields.len() as u16).to_be_bytes());
        body.extend_from_slice(&(bins.len() as u16).to_be_bytes());
        for f in fields {
            body.extend_from_slice(&(f.len() as u32 + 1).to_be_bytes());
            body.push(FIELD_DIGEST);
            body.extend_from_slice(f);
        }
        for (name, ptype, value) in bins {
            body.extend_from_slice(&((4 + name.len() + value.len()) as u32).to_be_bytes());
            body.extend_from_slice(&[OP_READ, *ptype, 0, name.len() as u8]);
            body.extend_from_slice(name);
            body.extend_from_slice(value);
        }
        let mut out = Vec::new();
        proto_header(&mut out, PROTO_TYPE_MSG, body.len());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn parses_result_codes_of_the_five_ops() {
        for code in [0u8, 2, 5, 9, 14, 22] {
            let bytes = reply_bytes(code, &[], &[]);
            let mut more = bytes.clone();
            more.extend_from_slice(&reply_bytes(0, &[], &[]));
            let (reply, used) = parse_reply(&more).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(
                reply,
                Reply {
                    result: ResultCode(code),
                    generation: 7,
                    expiration: 0x1234_5678,
                    bins: vec![],
                }
            );
        }
    }

    #[test]
    fn parses_a_read_reply_with_one_blob_bin() {
        let bytes = reply_bytes(0, &[&DIGEST], &[(b"v", PARTICLE_BLOB, b"\x00payload\xff")]);
        let (reply, used) = parse_reply(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(reply.result, ResultCode::OK);
        assert_eq!(
            reply.bin(b"v"),
            Some(&Bin {
                name: BinName::new(b"v").unwrap(),
                particle_type: PARTICLE_BLOB,
                value: b"\x00payload\xff".to_vec(),
            })
        );
        assert_eq!(reply.bin(b"w"), None);
    }

    #[test]
    fn every_prefix_of_a_reply_needs_more() {
        for bytes in [
            reply_bytes(
                0,
                &[&DIGEST],
                &[(b"v", PARTICLE_BLOB, b"abc"), (b"", 1, b"")],
            ),
            reply_bytes(5, &[], &[]),
        ] {
            for cut in 0..bytes.len() {
                assert_eq!(parse_reply(&bytes[..cut]), Ok(None), "prefix {cut}");
            }
        }
        let mut info = Vec::new();
        proto_header(&mut info, PROTO_TYPE_INFO, 10);
        info.extend_from_slice(b"status\tok\n");
        for cut in 0..info.len() {
            assert_eq!(parse_info_reply(&info[..cut]), Ok(None), "prefix {cut}");
        }
    }

    #[test]
    fn refuses_garbage_and_bad_lengths() {
        let ok = reply_bytes(0, &[], &[(b"v", 4, b"abc")]);
        let with = |at: usize, b: u8| {
            let mut v = ok.clone();
            v[at] = b;
            v
        };
        assert_eq!(
            parse_reply(b"HTTP/1.1"),
            Err(CodecError::ProtoVersion { got: b'H' })
        );
        assert_eq!(parse_reply(&[2, 4]), Err(CodecError::Compressed));
        assert_eq!(
            parse_reply(&[2, 1]),
            Err(CodecError::ProtoType { got: 1, want: 3 })
        );
        assert_eq!(
            parse_reply(&[2, 3, 0, 0, 0x08, 0, 0, 1]),
            Err(CodecError::ProtoLength {
                len: (128 << 20) + 1
            })
        );
        assert_eq!(
            parse_reply(&[2, 3, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
            Err(CodecError::ProtoLength { len: (1 << 48) - 1 })
        );
        assert_eq!(
            parse_reply(&[2, 3, 0, 0, 0, 0, 0, 21]),
            Err(CodecError::BodyTooShort { len: 21 })
        );
        assert_eq!(
            parse_reply(&with(8, 20)),
            Err(CodecError::HeaderSize { got: 20 })
        );
        // One op claimed more bytes than the body has, or fewer.
        assert!(matches!(
            parse_reply(&with(33, 100)),
            Err(CodecError::Op { .. })
        ));
        assert!(matches!(
            parse_reply(&with(33, 2)),
            Err(CodecError::Op { .. })
        ));
        assert!(matches!(
            parse_reply(&with(33, 6)),
            Err(CodecError::Trailing { extra: 2 })
        ));
        // Name longer than the op.
        assert!(matches!(
            parse_reply(&with(37, 9)),
            Err(CodecError::OpName { .. })
        ));
        // Two fields claimed: the op is read as the first, nothing is left
        // for the second.
        assert_eq!(
            parse_reply(&with(27, 2)),
            Err(CodecError::Field {
                index: 1,
                size: 0,
                left: 0
            })
        );
        // Thousands of ops claimed in a short body: refused before allocating.
        assert_eq!(
            parse_reply(&with(28, 0xFF)),
            Err(CodecError::OpCount {
                n_ops: 0xFF01,
                left: 12
            })
        );
        // A bin name over 15 bytes.
        let long = reply_bytes(0, &[], &[(&[b'n'; 16], 4, b"")]);
        assert_eq!(parse_reply(&long), Err(CodecError::BinName { len: 16 }));
    }

    #[test]
    fn result_codes_display_their_names() {
        assert_eq!(ResultCode::RECORD_EXISTS.to_string(), "RECORD_EXISTS (5)");
        assert_eq!(ResultCode(22).to_string(), "FORBIDDEN (22)");
        assert_eq!(ResultCode(13).to_string(), "RECORD_TOO_BIG (13)");
        assert_eq!(ResultCode(25).to_string(), "ENTERPRISE_ONLY (25)");
        assert_eq!(ResultCode(200).to_string(), "result code 200");
        assert_eq!(ResultCode(1).name(), Some("UNKNOWN"));
        assert_eq!(ResultCode(10).name(), None);
    }

    #[test]
    fn info_requests_and_replies() {
        let mut out = Vec::new();
        encode_info(&["status", "node"], &mut out);
        assert_eq!(out, b"\x02\x01\x00\x00\x00\x00\x00\x0cstatus\nnode\n");
        let body = b"status\tok\nnode\tBB9020011AC4202\nsindex\t\nbad\tERROR:4:unknown ns\nbare\n";
        let mut reply = Vec::new();
        proto_header(&mut reply, PROTO_TYPE_INFO, body.len());
        reply.extend_from_slice(body);
        let n = reply.len();
        reply.extend_from_slice(b"\x02\x01");
        let (pairs, used) = parse_info_reply(&reply).unwrap().unwrap();
        assert_eq!(used, n);
        let want = [
            ("status", "ok"),
            ("node", "BB9020011AC4202"),
            ("sindex", ""),
            ("bad", "ERROR:4:unknown ns"),
            ("bare", ""),
        ];
        let got: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            parse_info_reply(&[2, 1, 0, 0, 0, 0, 0, 0]),
            Ok(Some((vec![], 8)))
        );
        assert_eq!(
            parse_info_reply(&[2, 1, 0, 0, 0, 0, 0, 2, b'a', 0xFF]),
            Err(CodecError::InfoUtf8 { at: 1 })
        );
        assert_eq!(
            parse_info_reply(&[2, 3]),
            Err(CodecError::ProtoType { got: 3, want: 1 })
        );
    }

    fn bitmap_b64(owned: &[usize]) -> String {
        let mut bytes = [0u8; PARTITION_BITMAP_LEN];
        for &p in owned {
            bytes[p >> 3] |= 0x80 >> (p & 7);
        }
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn replicas_masters_from_a_hand_built_value() {
        let masters = [0usize, 1, 7, 8, 2513, 4095];
        let value = format!(
            "bar:0,2,{},{};test:0,2,{},{}",
            bitmap_b64(&[3]),
            bitmap_b64(&[]),
            bitmap_b64(&masters),
            bitmap_b64(&[2, 4094]),
        );
        let got = parse_replicas_masters(&value, "test").unwrap().unwrap();
        let owned: Vec<usize> = (0..PARTITIONS).filter(|&p| got[p]).collect();
        assert_eq!(owned, masters);
        let bar = parse_replicas_masters(&value, "bar").unwrap().unwrap();
        assert_eq!((0..PARTITIONS).filter(|&p| bar[p]).collect::<Vec<_>>(), [3]);
        assert_eq!(parse_replicas_masters(&value, "absent"), Ok(None));
        assert_eq!(parse_replicas_masters("", "test"), Ok(None));
    }

    #[test]
    fn replicas_refuses_malformed_values() {
        let b = bitmap_b64(&[1]);
        let short = &b[..680];
        for value in [
            format!("test:x,1,{b}"),
            format!("test:0,,{b}"),
            "test:0,0".to_owned(),
            format!("test:0,2,{b}"),
            format!("test:0,1,{b},{b}"),
            format!("test:0,1,{short}"),
            format!("test:0,1,{}!", &b[..683]),
        ] {
            assert!(
                matches!(
                    parse_replicas_masters(&value, "test"),
                    Err(CodecError::Replicas { .. })
                ),
                "{value:.40}"
            );
        }
    }

    fn peer(id: &str, addrs: &[(&str, u16)]) -> Peer {
        Peer {
            id: id.to_owned(),
            addrs: addrs.iter().map(|&(h, p)| (h.to_owned(), p)).collect(),
        }
    }

    #[test]
    fn parses_peers_clear_std() {
        let p = parse_peers_clear_std;
        assert_eq!(
            p("1,3000,[]").unwrap(),
            Peers {
                generation: 1,
                nodes: vec![],
            }
        );
        assert_eq!(
            p("3,3000,[[BB9020011AC4202,,[172.17.0.2]]]").unwrap().nodes,
            [peer("BB9020011AC4202", &[("172.17.0.2", 3000)])]
        );
        let three = "12,3000,[[BB9A,,[10.0.0.1:3000]],[BB9B,,[10.0.0.2:3100,node-b.example]],\
                     [BB9C,tls-c,[[2001:db8::1]:3000,[::1]]]]";
        let got = p(three).unwrap();
        assert_eq!(got.generation, 12);
        assert_eq!(
            got.nodes,
            [
                peer("BB9A", &[("10.0.0.1", 3000)]),
                peer("BB9B", &[("10.0.0.2", 3100), ("node-b.example", 3000)]),
                peer("BB9C", &[("2001:db8::1", 3000), ("::1", 3000)]),
            ]
        );
        assert_eq!(
            p("5,,[[A,,[h:1]]]").unwrap().nodes,
            [peer("A", &[("h", 1)])]
        );
        assert_eq!(p("5,3000,[[A,,[]]]").unwrap().nodes, [peer("A", &[])]);
    }

    #[test]
    fn peers_refuses_malformed_values() {
        for value in [
            "",
            "x,3000,[]",
            "1,99999,[]",
            "1,3000",
            "1,3000,[",
            "1,3000,[]x",
            "1,3000,[[,,[h]]]",
            "1,3000,[[A,,[h]]",
            "1,3000,[[A,,[::1]]]",
            "1,3000,[[A,,[[::1]:x]]]",
            "1,3000,[[A,,[:3000]]]",
            "1,,[[A,,[h]]]",
            "1,3000,[[A,,[h:70000]]]",
        ] {
            assert!(
                matches!(parse_peers_clear_std(value), Err(CodecError::Peers { .. })),
                "{value}"
            );
        }
        let many = format!("1,3000,[{}]", vec!["[A,,[h]]"; PEERS_MAX + 1].join(","));
        assert!(parse_peers_clear_std(&many).is_err());
    }

    #[test]
    fn every_parser_survives_arbitrary_bytes() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let valid = [
            reply_bytes(0, &[&DIGEST], &[(b"v", PARTICLE_BLOB, b"value")]),
            reply_bytes(2, &[], &[]),
        ];
        for round in 0..20_000 {
            // Random bytes behind a plausible header half the time, so the
            // body parser is reached, and mutated valid replies otherwise.
            let mut bytes = if round % 2 == 0 {
                let mut v = valid[round % 4 / 2].clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(v.len());
                    v[at] = rng.next() as u8;
                }
                v.truncate(rng.below(v.len() + 1));
                v
            } else {
                let len = rng.below(96);
                let mut v = rng.bytes(len);
                if len >= 9 && round % 3 != 0 {
                    v[..8].copy_from_slice(&[2, 3, 0, 0, 0, 0, 0, (len - 8) as u8]);
                    v[8] = 22;
                }
                v
            };
            if let Ok(Some((_, used))) = parse_reply(&bytes) {
                assert!(used <= bytes.len());
            }
            if bytes.len() > 1 {
                bytes[0] = 2;
                bytes[1] = 1;
            }
            if let Ok(Some((_, used))) = parse_info_reply(&bytes) {
                assert!(used <= bytes.len());
            }
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_peers_clear_std(&text);
            let _ = parse_replicas_masters(&text, "test");
        }
        // Structured noise for the text parsers.
        const PEER_ALPHABET: &[u8] = b"[],:0123A.h";
        const REPLICAS_ALPHABET: &[u8] = b"test:;,0123AQ==/+";
        for _ in 0..20_000 {
            let len = rng.below(48);
            let s: String = (0..len)
                .map(|_| PEER_ALPHABET[rng.below(PEER_ALPHABET.len())] as char)
                .collect();
            let _ = parse_peers_clear_std(&s);
            let s: String = (0..len)
                .map(|_| REPLICAS_ALPHABET[rng.below(REPLICAS_ALPHABET.len())] as char)
                .collect();
            let _ = parse_replicas_masters(&s, "test");
        }
    }
}

#[cfg(test)]
mod server_tests {
    use super::*;

    const DIGEST: [u8; 20] = [7; 20];

    fn encoded(op: Op<'_>, set: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_request(
            &Request {
                namespace: b"test",
                set,
                digest: &DIGEST,
                timeout_ms: 250,
                op,
            },
            &mut out,
        )
        .unwrap();
        out
    }

    #[test]
    fn requests_round_trip_through_parse_request() {
        let bin = BinName::new(b"v").unwrap();
        let cases = [
            (
                Op::SetNx {
                    ttl: Ttl::Seconds(60),
                    bin,
                    value: b"hello",
                },
                (0, 0x21, 0, 60),
            ),
            (
                Op::Set {
                    ttl: Ttl::Never,
                    bin,
                    value: b"",
                },
                (0, 0x01, 0x10, 0xFFFF_FFFF),
            ),
            (Op::Get { bin }, (0x01, 0, 0, 0xFFFF_FFFF)),
            (Op::Del, (0, 0x03, 0, 0)),
        ];
        for (op, (info1, info2, info3, ttl)) in cases {
            for set in [&b"set"[..], b""] {
                let mut bytes = encoded(op, set);
                let n = bytes.len();
                bytes.extend_from_slice(&[2, 3, 0]); // the start of the next one
                let (req, used) = parse_request(&bytes).unwrap().unwrap();
                assert_eq!(used, n);
                assert_eq!(
                    (req.info1, req.info2, req.info3, req.record_ttl),
                    (info1, info2, info3, ttl)
                );
                assert_eq!(req.timeout_ms, 250);
                assert_eq!(req.namespace.as_deref(), Some(&b"test"[..]));
                assert_eq!(req.set.as_deref(), (!set.is_empty()).then_some(set));
                assert_eq!(req.digest(), Some(DIGEST));
                assert_eq!(req.key, None);
                let ops: Vec<(u8, u8, &[u8], &[u8])> = req
                    .ops
                    .iter()
                    .map(|o| (o.op, o.particle_type, o.name.as_bytes(), &o.value[..]))
                    .collect();
                let want: Vec<(u8, u8, &[u8], &[u8])> = match op {
                    Op::SetNx { value, .. } | Op::Set { value, .. } => {
                        vec![(OP_WRITE, PARTICLE_BLOB, b"v", value)]
                    }
                    Op::Get { .. } => vec![(OP_READ, PARTICLE_NULL, b"v", b"")],
                    Op::Del => vec![],
                };
                assert_eq!(ops, want);
                assert_eq!(req.is_write(), info2 & 1 != 0);
                assert_eq!(req.is_delete(), matches!(op, Op::Del));
                assert_eq!(req.is_create_only(), matches!(op, Op::SetNx { .. }));
                assert_eq!(req.is_create_or_replace(), matches!(op, Op::Set { .. }));
                assert_eq!(req.is_read(), matches!(op, Op::Get { .. }));
                for cut in 0..n {
                    assert_eq!(parse_request(&bytes[..cut]), Ok(None), "prefix {cut}");
                }
            }
        }
    }

    #[test]
    fn parse_request_keeps_key_fields_and_odd_digests_raw() {
        // Hand-built: namespace, key field, a 3-byte "digest", unknown field 9.
        let mut body = vec![22, 0x01, 0, 0, 0, 0];
        body.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0]);
        for (t, d) in [(0u8, &b"ns"[..]), (2, b"\x04key"), (4, b"abc"), (9, b"zz")] {
            body.extend_from_slice(&(d.len() as u32 + 1).to_be_bytes());
            body.push(t);
            body.extend_from_slice(d);
        }
        let mut bytes = Vec::new();
        proto_header(&mut bytes, PROTO_TYPE_MSG, body.len());
        bytes.extend_from_slice(&body);
        let (req, _) = parse_request(&bytes).unwrap().unwrap();
        assert_eq!(req.generation, 1);
        assert_eq!(req.namespace.as_deref(), Some(&b"ns"[..]));
        assert_eq!(req.key.as_deref(), Some(&b"\x04key"[..]));
        assert_eq!(req.digest.as_deref(), Some(&b"abc"[..]));
        assert_eq!(req.digest(), None);
        assert!(req.ops.is_empty());
    }

    #[test]
    fn parse_request_refuses_garbage() {
        let ok = encoded(
            Op::SetNx {
                ttl: Ttl::Seconds(1),
                bin: BinName::new(b"v").unwrap(),
                value: b"abc",
            },
            b"set",
        );
        let with = |at: usize, b: u8| {
            let mut v = ok.clone();
            v[at] = b;
            v
        };
        assert_eq!(
            parse_request(b"GET / HTTP/1.1"),
            Err(CodecError::ProtoVersion { got: b'G' })
        );
        assert_eq!(
            parse_request(&[2, 1]),
            Err(CodecError::ProtoType { got: 1, want: 3 })
        );
        assert_eq!(parse_request(&[2, 4]), Err(CodecError::Compressed));
        assert_eq!(
            parse_request(&with(8, 21)),
            Err(CodecError::HeaderSize { got: 21 })
        );
        // n_ops = 0x0101 in a short body.
        assert!(matches!(
            parse_request(&with(28, 1)),
            Err(CodecError::OpCount { .. })
        ));
        // n_fields = 5: the op is read as a fourth field, nothing is left
        // for the fifth.
        assert!(matches!(
            parse_request(&with(27, 5)),
            Err(CodecError::Field { .. })
        ));
        // Op size over the body.
        let op_at = 30 + 42;
        assert!(matches!(
            parse_request(&with(op_at + 3, 200)),
            Err(CodecError::Op { .. })
        ));
        // Op size too small: trailing bytes.
        assert!(matches!(
            parse_request(&with(op_at + 3, 5)),
            Err(CodecError::Trailing { .. })
        ));
        // Name longer than the op.
        assert!(matches!(
            parse_request(&with(op_at + 7, 9)),
            Err(CodecError::OpName { .. })
        ));
    }

    #[test]
    fn replies_round_trip_through_parse_reply() {
        let mut out = b"x".to_vec();
        encode_reply(
            &mut out,
            ResultCode::OK,
            3,
            0x0102_0304,
            &[
                (b"v", PARTICLE_BLOB, b"\x00val"),
                (b"n", PARTICLE_INTEGER, &[0; 8]),
            ],
        )
        .unwrap();
        encode_reply(&mut out, ResultCode::NOT_FOUND, 0, 0, &[]).unwrap();
        let (reply, used) = parse_reply(&out[1..]).unwrap().unwrap();
        assert_eq!(reply.result, ResultCode::OK);
        assert_eq!((reply.generation, reply.expiration), (3, 0x0102_0304));
        assert_eq!(reply.bin(b"v").unwrap().value, b"\x00val");
        assert_eq!(reply.bin(b"v").unwrap().particle_type, PARTICLE_BLOB);
        assert_eq!(reply.bin(b"n").unwrap().particle_type, PARTICLE_INTEGER);
        let (miss, used2) = parse_reply(&out[1 + used..]).unwrap().unwrap();
        assert_eq!(1 + used + used2, out.len());
        assert_eq!(miss.result, ResultCode::NOT_FOUND);
        assert!(miss.bins.is_empty());
        let mut keep = b"keep".to_vec();
        assert_eq!(
            encode_reply(&mut keep, ResultCode::OK, 0, 0, &[(&[b'n'; 16], 4, b"")]),
            Err(CodecError::BinName { len: 16 })
        );
        assert_eq!(keep, b"keep");
    }

    #[test]
    fn info_requests_and_replies_round_trip() {
        let mut out = Vec::new();
        encode_info(&["node", "replicas", "status"], &mut out);
        let n = out.len();
        out.push(2);
        let (cmds, used) = parse_info_request(&out).unwrap().unwrap();
        assert_eq!(
            (cmds, used),
            (vec!["node".into(), "replicas".into(), "status".into()], n)
        );
        for cut in 0..n {
            assert_eq!(parse_info_request(&out[..cut]), Ok(None));
        }
        // A last command without '\n' is ignored; empty lines are skipped.
        let mut raw = Vec::new();
        proto_header(&mut raw, PROTO_TYPE_INFO, 12);
        raw.extend_from_slice(b"node\n\nstatus");
        assert_eq!(
            parse_info_request(&raw).unwrap().unwrap().0,
            vec!["node".to_owned()]
        );
        assert_eq!(
            parse_info_request(&[2, 1, 0, 0, 0, 0, 0, 1, 0xFF]),
            Err(CodecError::InfoUtf8 { at: 0 })
        );
        assert_eq!(
            parse_info_request(&[2, 3]),
            Err(CodecError::ProtoType { got: 3, want: 1 })
        );

        let mut reply = Vec::new();
        encode_info_reply(
            &mut reply,
            &[
                ("status", "ok"),
                ("cluster-name", ""),
                ("x", "ERROR:4:not supported"),
            ],
        );
        let (pairs, used) = parse_info_reply(&reply).unwrap().unwrap();
        assert_eq!(used, reply.len());
        assert_eq!(
            pairs,
            [
                ("status".to_owned(), "ok".to_owned()),
                ("cluster-name".to_owned(), String::new()),
                ("x".to_owned(), "ERROR:4:not supported".to_owned()),
            ]
        );
    }

    #[test]
    fn server_parsers_survive_arbitrary_bytes() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = encoded(
            Op::SetNx {
                ttl: Ttl::Seconds(5),
                bin: BinName::new(b"v").unwrap(),
                value: b"value",
            },
            b"set",
        );
        for round in 0..20_000 {
            let mut v = valid.clone();
            if round % 2 == 0 {
                for _ in 0..1 + next() % 4 {
                    let at = (next() % v.len() as u64) as usize;
                    v[at] = next() as u8;
                }
                v.truncate((next() % (v.len() as u64 + 1)) as usize);
            } else {
                let len = (next() % 96) as usize;
                v = (0..len).map(|_| next() as u8).collect();
                if len >= 9 {
                    v[..8].copy_from_slice(&[2, 3, 0, 0, 0, 0, 0, (len - 8) as u8]);
                    v[8] = 22;
                }
            }
            if let Ok(Some((_, used))) = parse_request(&v) {
                assert!(used <= v.len());
            }
            if v.len() > 1 {
                v[1] = 1;
            }
            if let Ok(Some((_, used))) = parse_info_request(&v) {
                assert!(used <= v.len());
            }
        }
    }
}
