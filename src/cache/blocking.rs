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
        // What is left, before every read: a peer trickling bytes must not
        // stretch the round trip past its deadline.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RoundTripError::Timeout);
        }
        set_timeout(stream, left).map_err(io)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// A peer that answers one byte at a time, each just under the time
    /// left, never finishing: the round trip still ends at its deadline
    /// (a socket timeout set once would let the last read run a whole
    /// timeout past it).
    #[test]
    fn a_trickling_peer_cannot_stretch_the_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = [0u8; 4];
            let _ = c.read_exact(&mut req);
            for _ in 0..4 {
                std::thread::sleep(Duration::from_millis(1900));
                if c.write_all(b"x").is_err() {
                    return;
                }
            }
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let started = Instant::now();
        let deadline = started + Duration::from_secs(2);
        let got = round_trip(
            &mut s,
            |s, t| s.set_read_timeout(Some(t)),
            b"ping",
            deadline,
            1024,
            |b: &[u8]| Ok::<_, ()>(b.iter().position(|&c| c == b'\n').map(|i| ((), i + 1))),
        );
        assert!(matches!(got, Err(RoundTripError::Timeout)), "{got:?}");
        let took = started.elapsed();
        assert!(took < Duration::from_millis(2900), "took {took:?}");
    }
}
