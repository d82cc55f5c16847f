//! The admin listener: a small HTTP/1.1 server for `/metrics`, `/readyz`
//! and `/livez`.
//!
//! It is a cold path: the handler reads snapshots the shards publish and
//! never touches a shard's hot state. Each connection gets a thread of its
//! own, at most [`CONNS_MAX`] at once (more are turned away with 503 at
//! once), so a client that connects and sends nothing cannot hold the
//! health checks of everyone else. A request is at most 8 KiB, and one
//! deadline bounds reading it and writing the answer, so a slow or hostile
//! client costs a bounded wait, not a thread.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const REQUEST_MAX_BYTES: usize = 8 << 10;
/// The bound on reading a request, and again on writing its answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections answered at once; past it a new one is refused with 503.
pub const CONNS_MAX: usize = 8;

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
    /// Binds `addr` and serves `handler` from a thread named `txgate-admin`.
    pub fn start(addr: SocketAddr, handler: Handler) -> io::Result<Admin> {
        let listener = TcpListener::bind(addr)?;
        Self::serve(listener, handler)
    }

    /// Serves `handler` on a listener already bound (bind early, before the
    /// rest starts, so a taken port fails the start-up cleanly).
    pub fn serve(listener: TcpListener, handler: Handler) -> io::Result<Admin> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let busy = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new()
            .name("txgate-admin".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::Relaxed) {
                        return;
                    }
                    match conn {
                        Ok(conn) => dispatch(conn, &handler, &busy),
                        // Out of descriptors, say: wait rather than spin.
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
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

/// Counts a connection being answered for as long as it lives.
struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers `conn` on a thread of its own, or refuses it at once when
/// [`CONNS_MAX`] are being answered (or no thread can be had).
fn dispatch(conn: TcpStream, handler: &Handler, busy: &Arc<AtomicUsize>) {
    if busy.fetch_add(1, Ordering::AcqRel) >= CONNS_MAX {
        busy.fetch_sub(1, Ordering::AcqRel);
        refuse(conn);
        return;
    }
    let guard = Busy(busy.clone());
    let handler = handler.clone();
    let spawned = std::thread::Builder::new()
        .name("txgate-admin-conn".into())
        .spawn(move || {
            let _guard = guard;
            let _ = answer(conn, &*handler);
        });
    if spawned.is_err() {
        // The closure, its guard and the connection were dropped with it.
        tracing::warn!("admin: no thread for a connection; closed it");
    }
}

/// A 503 written without waiting: the answer fits the socket's buffer, and
/// a client that cannot take it loses nothing it was owed.
fn refuse(mut conn: TcpStream) {
    let _ = conn.set_nonblocking(true);
    let body = "busy: too many admin connections\n";
    let _ = conn.write_all(
        format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let _ = conn.shutdown(std::net::Shutdown::Write);
    // Whatever of the request came already, so closing sends no reset.
    let mut buf = [0u8; 4096];
    let _ = conn.read(&mut buf);
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestError {
    /// Not `METHOD SP TARGET SP HTTP/1.x`.
    Malformed,
    /// A method other than GET or HEAD.
    Method,
}

/// Parses the request line (ended by CRLF or a bare LF, which HTTP asks
/// servers to accept): `(is_head, path without query)`.
pub fn parse_request(head: &[u8]) -> Result<(bool, &str), RequestError> {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = head[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&head[..line_end]);
    let line = std::str::from_utf8(line).map_err(|_| RequestError::Malformed)?;
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

/// Whether `head` holds a whole request head (an empty line ends it).
fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

fn answer(mut conn: TcpStream, handler: &dyn Fn(&str) -> Response) -> io::Result<()> {
    // One deadline for the whole request, not per read: a client trickling
    // a byte at a time must not hold its thread.
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head_complete(&head) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        conn.set_read_timeout(Some(left))?;
        if head.len() >= REQUEST_MAX_BYTES {
            let deadline = Instant::now() + IO_TIMEOUT;
            let too_large = Response::text(431, "request too large\n");
            write_response(&mut conn, false, &too_large, deadline)?;
            return linger(conn, deadline);
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
    // Its own deadline: the handler may have waited (`/readyz`, boundedly).
    write_response(&mut conn, is_head, &response, Instant::now() + IO_TIMEOUT)
}

/// Closes after an early answer without resetting the connection: reads
/// (boundedly, until `deadline`) what the client is still sending, so it
/// gets the response.
fn linger(mut conn: TcpStream, deadline: Instant) -> io::Result<()> {
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        conn.set_read_timeout(Some(left.min(Duration::from_millis(200))))?;
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Writes `r` by `deadline`: each write waits at most what is left, so a
/// client reading slowly cannot stretch it.
fn write_response(
    conn: &mut TcpStream,
    is_head: bool,
    r: &Response,
    deadline: Instant,
) -> io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let allow = if r.status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    if !is_head {
        out.extend_from_slice(r.body.as_bytes());
    }
    let mut rest = &out[..];
    while !rest.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        conn.set_write_timeout(Some(left))?;
        match conn.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

    /// [`get`], with a reset or a broken pipe read as `"reset"`.
    fn try_get(addr: SocketAddr, raw: &str) -> String {
        let attempt = || -> io::Result<String> {
            let mut c = TcpStream::connect(addr)?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(raw.as_bytes())?;
            let mut s = String::new();
            c.read_to_string(&mut s)?;
            Ok(s)
        };
        match attempt() {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) =>
            {
                "reset".into()
            }
            Err(e) => panic!("{e}"),
        }
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
        let r = get(a, "DELETE /livez HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 405") && r.contains("\r\nAllow: GET, HEAD\r\n"),
            "{r}"
        );
        // Bare LF line ends (`printf 'GET / HTTP/1.0\n\n' | nc`) are a request.
        assert!(get(a, "GET /livez HTTP/1.0\n\n").starts_with("HTTP/1.1 200"));
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

    #[test]
    fn idle_connections_do_not_hold_the_others_and_a_crowd_is_turned_away() {
        let admin = Admin::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(|_: &str| Response::text(200, "ok\n")),
        )
        .unwrap();
        let a = admin.local_addr();
        // Connected, silent: each would have held a one-at-a-time server
        // for its whole read deadline.
        let idle: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(a).unwrap()).collect();
        let asked = Instant::now();
        assert!(get(a, "GET /livez HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
        assert!(asked.elapsed() < IO_TIMEOUT, "{:?}", asked.elapsed());
        // More silent ones than it answers at once: the next is refused
        // with 503 at once rather than queued behind them.
        let crowd: Vec<TcpStream> = (0..CONNS_MAX)
            .map(|_| TcpStream::connect(a).unwrap())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // A refusal may also arrive as a reset: the refused connection
            // is closed at once, maybe before the request reached it.
            let r = try_get(a, "GET /livez HTTP/1.1\r\n\r\n");
            if r.starts_with("HTTP/1.1 503") || r == "reset" {
                assert!(
                    r == "reset" || r.contains("too many admin connections"),
                    "{r}"
                );
                break;
            }
            // The accept thread may not have reached every one yet.
            assert!(Instant::now() < deadline, "never refused: {r}");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Once they hang up, it answers again.
        drop((idle, crowd));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !get(a, "GET /livez HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200") {
            assert!(Instant::now() < deadline, "still busy");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_client_reading_slowly_is_cut_off_after_one_timeout() {
        const BODY: usize = 32 << 20;
        let admin = Admin::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(|_: &str| Response::text(200, "x".repeat(BODY))),
        )
        .unwrap();
        let mut c = TcpStream::connect(admin.local_addr()).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        // 4 KiB every 100 ms for 3 s: every write of the server makes
        // progress, so a timeout per write would never fire.
        let started = Instant::now();
        let mut got = 0usize;
        let mut buf = [0u8; 1 << 16];
        while started.elapsed() < IO_TIMEOUT + Duration::from_secs(1) {
            match c.read(&mut buf[..4096]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Then at full speed: a server still writing would now deliver it
        // all; one that gave up at its deadline has only what it had queued.
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
            assert!(started.elapsed() < Duration::from_secs(20), "never ended");
        }
        assert!(got < BODY, "the whole body came ({got} bytes)");
        eprintln!("got {got} of {BODY} bytes");
    }
}
