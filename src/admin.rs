//! The admin listener: a small HTTP/1.1 server on its own thread, one
//! connection at a time, for `/metrics`, `/readyz` and `/livez`.
//!
//! It is a cold path: the handler reads snapshots the shards publish and
//! never touches a shard's hot state. Every read and write has a timeout and
//! a request is at most 8 KiB, so a slow or hostile client costs a bounded
//! wait, not a thread.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

const REQUEST_MAX_BYTES: usize = 8 << 10;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// What a handler answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    /// `status` with a plain-text body.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// Maps a request path (query stripped) to a response.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// A running admin listener; stops when dropped.
pub struct Admin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Admin {
    /// Binds `addr` and serves `handler` on a thread named `txgate-admin`.
    pub fn start(addr: SocketAddr, handler: Handler) -> io::Result<Admin> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("txgate-admin".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Ok(conn) = conn {
                        let _ = answer(conn, &*handler);
                    }
                }
            })?;
        Ok(Admin {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestError {
    /// Not `METHOD SP TARGET SP HTTP/1.x`.
    Malformed,
    /// A method other than GET or HEAD.
    Method,
}

/// Parses the request line: `(is_head, path without query)`.
pub fn parse_request(head: &[u8]) -> Result<(bool, &str), RequestError> {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(head.len());
    let line = std::str::from_utf8(&head[..line_end]).map_err(|_| RequestError::Malformed)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Malformed);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(RequestError::Malformed);
    }
    let path = target.split('?').next().unwrap_or(target);
    match method {
        "GET" => Ok((false, path)),
        "HEAD" => Ok((true, path)),
        _ => Err(RequestError::Method),
    }
}

fn answer(mut conn: TcpStream, handler: &dyn Fn(&str) -> Response) -> io::Result<()> {
    // One deadline for the whole request, not per read: a client trickling
    // a byte at a time must not hold the only admin thread.
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        conn.set_read_timeout(Some(left))?;
        if head.len() >= REQUEST_MAX_BYTES {
            write_response(
                &mut conn,
                false,
                &Response::text(431, "request too large\n"),
            )?;
            return linger(conn);
        }
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let (is_head, response) = match parse_request(&head) {
        Ok((is_head, path)) => (is_head, handler(path)),
        Err(RequestError::Method) => (false, Response::text(405, "only GET and HEAD\n")),
        Err(RequestError::Malformed) => (false, Response::text(400, "malformed request\n")),
    };
    write_response(&mut conn, is_head, &response)
}

/// Closes after an early answer without resetting the connection: reads
/// (boundedly) what the client is still sending, so it gets the response.
fn linger(mut conn: TcpStream) -> io::Result<()> {
    conn.shutdown(std::net::Shutdown::Write)?;
    conn.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}

fn write_response(conn: &mut TcpStream, is_head: bool, r: &Response) -> io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    if !is_head {
        out.extend_from_slice(r.body.as_bytes());
    }
    conn.write_all(&out)?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_or_are_refused() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok((false, "/metrics"))
        );
        assert_eq!(
            parse_request(b"HEAD /readyz?verbose=1 HTTP/1.0\r\n\r\n"),
            Ok((true, "/readyz"))
        );
        assert_eq!(
            parse_request(b"POST /livez HTTP/1.1\r\n\r\n"),
            Err(RequestError::Method)
        );
        assert_eq!(
            parse_request(b"GET metrics HTTP/1.1\r\n\r\n"),
            Err(RequestError::Malformed)
        );
        assert_eq!(
            parse_request(b"GET / SPDY/3\r\n\r\n"),
            Err(RequestError::Malformed)
        );
        assert_eq!(
            parse_request(b"\xff\xfe\r\n\r\n"),
            Err(RequestError::Malformed)
        );
        assert_eq!(parse_request(b""), Err(RequestError::Malformed));
    }

    fn get(addr: SocketAddr, raw: &str) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(raw.as_bytes()).unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn serves_the_handler_and_refuses_the_rest() {
        let admin = Admin::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(|path: &str| match path {
                "/livez" => Response::text(200, "ok\n"),
                _ => Response::text(404, "no\n"),
            }),
        )
        .unwrap();
        let a = admin.local_addr();
        let r = get(a, "GET /livez HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\nok\n"),
            "{r}"
        );
        let r = get(a, "HEAD /livez HTTP/1.1\r\n\r\n");
        assert!(
            r.contains("Content-Length: 3\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        assert!(get(a, "GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(a, "DELETE /livez HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        let big = format!("GET /livez HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
        assert!(get(a, &big).starts_with("HTTP/1.1 431"));
        drop(admin);
        assert!(TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_err());
    }

    #[test]
    fn a_client_trickling_its_request_is_cut_off_after_one_timeout() {
        let admin = Admin::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(|_: &str| Response::text(200, "ok\n")),
        )
        .unwrap();
        let a = admin.local_addr();
        let mut slow = TcpStream::connect(a).unwrap();
        let started = std::time::Instant::now();
        // A byte every 300 ms: each read is quick, the request never ends.
        let mut cut_off = None;
        for b in b"GET /livez HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
            if slow.write_all(&[*b]).is_err() {
                cut_off = Some(started.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
            slow.set_read_timeout(Some(Duration::from_millis(1)))
                .unwrap();
            let mut buf = [0u8; 16];
            if matches!(slow.read(&mut buf), Ok(0)) {
                cut_off = Some(started.elapsed());
                break;
            }
        }
        let cut_off = cut_off.expect("the server closed the trickling connection");
        assert!(cut_off < IO_TIMEOUT + Duration::from_secs(1), "{cut_off:?}");
        // And the thread is free for the next client.
        assert!(get(a, "GET /livez HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
    }
}
