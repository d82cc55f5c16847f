//! RESP2, sans I/O: commands composed into a buffer, replies parsed from
//! bytes (with the `redis-protocol` crate) into [`Reply`] values.
//!
//! Replies come from the network, so the parser must survive any bytes: a
//! bounded iterative pre-scan finds where a reply ends and refuses nesting
//! deeper than [`DEPTH_MAX`] (deep nesting would otherwise recurse without
//! bound) before the crate decodes it. Commands are arrays of bulk strings,
//! written straight into the connection's write buffer.

use redis_protocol::resp2::decode::decode_range;
use redis_protocol::resp2::types::RangeFrame;

/// Deepest array nesting accepted in a reply (CLUSTER SLOTS uses 3).
pub const DEPTH_MAX: usize = 8;
/// Largest reply element accepted: a 512 MiB Redis string.
pub const BULK_MAX: usize = 512 << 20;
/// Longest status (`+`) or error (`-`) line accepted: servers send short
/// ones (`OK`, `PONG`, `MOVED 3999 10.0.0.1:6379`).
pub const LINE_MAX: usize = 64 << 10;

/// A parsed reply. `+OK` gets its own arm so the common SET reply allocates
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Simple(Vec<u8>),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Reply>),
}

/// Bytes that are not a RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    #[error("not a RESP reply: unexpected byte {byte:#04x} at offset {at}")]
    Type { byte: u8, at: usize },
    #[error("malformed RESP length at offset {at}")]
    Length { at: usize },
    #[error("RESP reply nests deeper than {DEPTH_MAX}")]
    Depth,
    #[error("RESP decode failed: {0}")]
    Decode(String),
}

/// Appends `*N\r\n$len\r\narg\r\n…`: one command. Reserves once; every
/// claim goes through here.
pub fn encode_command(buf: &mut Vec<u8>, args: &[&[u8]]) {
    let total: usize = args.iter().map(|a| a.len() + 16).sum::<usize>() + 16;
    buf.reserve(total);
    header(buf, b'*', args.len());
    for a in args {
        header(buf, b'$', a.len());
        buf.extend_from_slice(a);
        buf.extend_from_slice(b"\r\n");
    }
}

/// `{kind}{n}\r\n`, with the short lengths of typical commands written
/// directly.
#[inline]
fn header(buf: &mut Vec<u8>, kind: u8, n: usize) {
    if n < 10 {
        buf.extend_from_slice(&[kind, b'0' + n as u8, b'\r', b'\n']);
    } else if n < 100 {
        buf.extend_from_slice(&[
            kind,
            b'0' + (n / 10) as u8,
            b'0' + (n % 10) as u8,
            b'\r',
            b'\n',
        ]);
    } else {
        buf.push(kind);
        buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
}

/// Parses one reply from the front of `buf`: the reply and the bytes it
/// used, `Ok(None)` when `buf` holds only part of one.
pub fn decode_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
    // The two replies every claim gets (`SET … NX`: created or not), spelled
    // out; everything else goes through the crate.
    if buf.starts_with(b"+OK\r\n") {
        return Ok(Some((Reply::Ok, 5)));
    }
    if buf.starts_with(b"$-1\r\n") {
        return Ok(Some((Reply::Nil, 5)));
    }
    let Some(len) = frame_len(buf)? else {
        return Ok(None);
    };
    let frame = &buf[..len];
    match decode_range(frame) {
        Ok(Some((f, used))) if used == len => Ok(Some((to_reply(frame, f), len))),
        Ok(Some((_, used))) => Err(RespError::Decode(format!(
            "frame of {len} bytes decoded as {used}"
        ))),
        Ok(None) => Err(RespError::Decode(
            "complete frame reported incomplete".into(),
        )),
        Err(e) => Err(RespError::Decode(e.to_string())),
    }
}

fn to_reply(buf: &[u8], f: RangeFrame) -> Reply {
    match f {
        RangeFrame::SimpleString((s, e)) if &buf[s..e] == b"OK" => Reply::Ok,
        RangeFrame::SimpleString((s, e)) => Reply::Simple(buf[s..e].to_vec()),
        RangeFrame::Error((s, e)) => Reply::Error(String::from_utf8_lossy(&buf[s..e]).into_owned()),
        RangeFrame::Integer(i) => Reply::Int(i),
        RangeFrame::BulkString((s, e)) => Reply::Bulk(buf[s..e].to_vec()),
        RangeFrame::Array(items) => {
            Reply::Array(items.into_iter().map(|i| to_reply(buf, i)).collect())
        }
        RangeFrame::Null => Reply::Nil,
    }
}

/// Where the reply at the front of `buf` ends, without recursion: a stack
/// of "elements still to read" per open array.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, RespError> {
    let mut at = 0usize;
    let mut open: [i64; DEPTH_MAX] = [0; DEPTH_MAX];
    let mut depth = 0usize;
    loop {
        let Some(&kind) = buf.get(at) else {
            return Ok(None);
        };
        let Some(line_end) = find_crlf(buf, at + 1) else {
            // A header line longer than any valid one cannot become valid;
            // nor can a status or error line past its bound (each read
            // rescans it: unbounded, a broken peer could pin the shard).
            let bound = if kind == b'+' || kind == b'-' {
                LINE_MAX
            } else {
                64
            };
            if buf.len() - at > bound {
                return Err(RespError::Length { at });
            }
            return Ok(None);
        };
        if line_end - at > LINE_MAX {
            return Err(RespError::Length { at });
        }
        let line = &buf[at + 1..line_end];
        let next = line_end + 2;
        match kind {
            b'+' | b'-' => at = next,
            b':' => {
                parse_int(line).ok_or(RespError::Length { at })?;
                at = next;
            }
            b'$' => {
                let n = parse_int(line).ok_or(RespError::Length { at })?;
                if n == -1 {
                    at = next;
                } else if n < 0 || n as usize > BULK_MAX {
                    return Err(RespError::Length { at });
                } else {
                    let end = next + n as usize;
                    if buf.len() < end + 2 {
                        return Ok(None);
                    }
                    if &buf[end..end + 2] != b"\r\n" {
                        return Err(RespError::Length { at });
                    }
                    at = end + 2;
                }
            }
            b'*' => {
                let n = parse_int(line).ok_or(RespError::Length { at })?;
                if n < -1 {
                    return Err(RespError::Length { at });
                }
                at = next;
                if n > 0 {
                    if depth == DEPTH_MAX {
                        return Err(RespError::Depth);
                    }
                    open[depth] = n;
                    depth += 1;
                    continue;
                }
            }
            byte => return Err(RespError::Type { byte, at }),
        }
        // One element done: close every array it completes.
        loop {
            if depth == 0 {
                return Ok(Some(at));
            }
            open[depth - 1] -= 1;
            if open[depth - 1] > 0 {
                break;
            }
            depth -= 1;
        }
    }
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    let rest = buf.get(from..)?;
    rest.windows(2).position(|w| w == b"\r\n").map(|p| from + p)
}

fn parse_int(line: &[u8]) -> Option<i64> {
    if line.is_empty() || line.len() > 20 {
        return None;
    }
    std::str::from_utf8(line).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_as_arrays_of_bulk_strings() {
        let mut b = Vec::new();
        encode_command(&mut b, &[b"SET", b"k\r\n", b""]);
        assert_eq!(b, b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$0\r\n\r\n");
        for n in [9usize, 10, 99, 100, 1000, 65536] {
            let mut b = Vec::new();
            encode_command(&mut b, &[&vec![b'x'; n]]);
            let want = format!("*1\r\n${n}\r\n{}\r\n", "x".repeat(n));
            assert_eq!(b, want.as_bytes(), "length {n}");
            let args: Vec<Vec<u8>> = (0..n.min(120)).map(|i| vec![b'a'; i % 3]).collect();
            let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
            let mut b = Vec::new();
            encode_command(&mut b, &refs);
            assert!(b.starts_with(format!("*{}\r\n", refs.len()).as_bytes()));
        }
    }

    #[test]
    fn decodes_every_reply_kind() {
        let cases: &[(&[u8], Reply)] = &[
            (b"+OK\r\n", Reply::Ok),
            (b"+PONG\r\n", Reply::Simple(b"PONG".to_vec())),
            (b"-ERR bad\r\n", Reply::Error("ERR bad".into())),
            (b":-42\r\n", Reply::Int(-42)),
            (b"$3\r\na\r\n\r\n", Reply::Bulk(b"a\r\n".to_vec())),
            (b"$0\r\n\r\n", Reply::Bulk(vec![])),
            (b"$-1\r\n", Reply::Nil),
            (b"*-1\r\n", Reply::Nil),
            (b"*0\r\n", Reply::Array(vec![])),
            (
                b"*2\r\n*1\r\n:1\r\n$1\r\nx\r\n",
                Reply::Array(vec![
                    Reply::Array(vec![Reply::Int(1)]),
                    Reply::Bulk(b"x".to_vec()),
                ]),
            ),
        ];
        for (bytes, want) in cases {
            let mut buf = bytes.to_vec();
            buf.extend_from_slice(b"+OK\r\n");
            assert_eq!(
                decode_reply(&buf).unwrap(),
                Some((want.clone(), bytes.len())),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
            for cut in 0..bytes.len() {
                assert_eq!(decode_reply(&bytes[..cut]).unwrap(), None, "prefix {cut}");
            }
        }
    }

    #[test]
    fn refuses_garbage_and_deep_nesting() {
        assert!(matches!(
            decode_reply(b"HTTP/1.1 400 Bad Request\r\n"),
            Err(RespError::Type { .. })
        ));
        assert!(decode_reply(b"$abc\r\n").is_err());
        assert!(decode_reply(b"$5\r\nabcdeXX").is_err());
        assert!(decode_reply(b"*-5\r\n").is_err());
        let deep = b"*1\r\n".repeat(DEPTH_MAX + 1);
        assert_eq!(decode_reply(&deep), Err(RespError::Depth));
        let deep_ok = [b"*1\r\n".repeat(DEPTH_MAX), b":1\r\n".to_vec()].concat();
        assert!(decode_reply(&deep_ok).unwrap().is_some());
    }

    #[test]
    fn bounds_status_and_error_lines() {
        for kind in [b'+', b'-'] {
            let mut line = vec![kind];
            line.resize(LINE_MAX, b'x');
            line.extend_from_slice(b"\r\n");
            assert!(decode_reply(&line).unwrap().is_some(), "at the bound");
            // Past it: refused whole, and refused before the line ends.
            line.insert(1, b'x');
            assert!(decode_reply(&line).is_err());
            assert!(decode_reply(&line[..LINE_MAX + 2]).is_err());
            // A long status line inside an array too.
            let nested = [b"*1\r\n".as_slice(), &line].concat();
            assert!(decode_reply(&nested).is_err());
        }
    }

    #[test]
    fn survives_arbitrary_bytes() {
        let mut s = 7u64;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len % 64)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    const ALPHABET: &[u8] = b"*$:+-\r\n0123-9x";
                    ALPHABET[(s >> 33) as usize % ALPHABET.len()]
                })
                .collect();
            let _ = decode_reply(&bytes);
        }
    }
}
