//! UDP helpers for gate tests: a sink that collects what the gate forwards
//! and a paced sender, both on loopback with bounded waits.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Collects every datagram sent to it, on its own thread.
pub struct Sink {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    pub fn start() -> Sink {
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .unwrap();
        let _ = s.set_recv_buffer_size(4 << 20);
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let sock: UdpSocket = s.into();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, st) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !st.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    g.lock().unwrap().push(buf[..n].to_vec());
                }
            }
        });
        Sink {
            addr,
            got,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    pub fn received(&self) -> Vec<Vec<u8>> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `n` datagrams arrived, then a further quiet `settle` so
    /// extra (duplicate) ones would show; panics after `limit`.
    pub fn wait_for(&self, n: usize, limit: Duration, settle: Duration) -> Vec<Vec<u8>> {
        let end = Instant::now() + limit;
        while self.count() < n {
            assert!(
                Instant::now() < end,
                "sink got {} of {n} datagrams within {limit:?}",
                self.count()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(settle);
        self.received()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `packets` to `to`, pausing 1 ms every `burst` so a test never
/// overruns a receive buffer.
pub fn send_paced(to: SocketAddr, packets: &[Vec<u8>], burst: usize) {
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    for (i, p) in packets.iter().enumerate() {
        tx.send_to(p, to).unwrap();
        if i % burst.max(1) == burst.max(1) - 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A datagram carrying `txid` at `offset`, with a recognisable body.
pub fn datagram(txid: &[u8], offset: usize, body: &[u8]) -> Vec<u8> {
    let mut p = vec![0xEE; offset];
    p.extend_from_slice(txid);
    p.extend_from_slice(body);
    p
}
