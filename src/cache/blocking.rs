//! One blocking request/reply round trip, for the cold paths that verify a
//! server before any shard starts (`open`) or probe it from a plain thread
//! (Aerospike tending). Bounded by an absolute deadline and a reply size.

use std::io::{self, Read, Write};
use std::time::Instant;

/// Why a round trip got no reply.
#[derive(Debug)]
pub(crate) enum RoundTripError<E> {
    /// The deadline passed (or a socket timeout derived from it fired).
    Timeout,
    Io(io::Error),
    /// The peer closed the connection first.
    Closed,
    /// The bytes are not this protocol; carries the first bytes received.
    Decode(E, Vec<u8>),
    /// No complete reply within `reply_bytes_max`.
    TooLarge,
}

/// Writes `request` to `stream` and reads until `decode` yields a reply.
/// `set_timeout` applies what is left of the deadline to the socket.
pub(crate) fn round_trip<S, T, E>(
    stream: &mut S,
    set_timeout: impl Fn(&S, std::time::Duration) -> io::Result<()>,
    request: &[u8],
    deadline: Instant,
    reply_bytes_max: usize,
    decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, E>,
) -> Result<T, RoundTripError<E>>
where
    S: Read + Write,
{
    let io = |e: io::Error| match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => RoundTripError::Timeout,
        _ => RoundTripError::Io(e),
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(RoundTripError::Timeout);
    }
    set_timeout(stream, left).map_err(io)?;
    stream.write_all(request).map_err(io)?;
    stream.flush().map_err(io)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while buf.len() < reply_bytes_max {
        if Instant::now() >= deadline {
            return Err(RoundTripError::Timeout);
        }
        let n = stream.read(&mut chunk).map_err(io)?;
        if n == 0 {
            return Err(RoundTripError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        match decode(&buf) {
            Ok(Some((reply, _))) => return Ok(reply),
            Ok(None) => {}
            Err(e) => {
                buf.truncate(40);
                return Err(RoundTripError::Decode(e, buf));
            }
        }
    }
    Err(RoundTripError::TooLarge)
}
