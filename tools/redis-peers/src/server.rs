//! The redis-server under test: started here (pinned, on a free loopback
//! port, no persistence) or given by address, plus a control connection for
//! FLUSHALL, DBSIZE and INFO between runs.

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for a started server to answer PING.
const START_LIMIT: Duration = Duration::from_secs(5);
/// Bound on every control command.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Server {
    /// `host:port`.
    pub addr: String,
    /// Our own redis-server, killed on drop (and, through PDEATHSIG, when
    /// this tool dies some other way).
    own: Option<Child>,
    con: redis::Connection,
}

impl Server {
    /// Starts `redis-server` on a free loopback port, pinned to `core`, and
    /// waits (≤ 5 s) until it answers.
    pub fn start(bin: &str, core: usize, log: &Path) -> Result<Self, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        let log_file =
            std::fs::File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file);
        crate::child::pin_and_tether(&mut cmd, core);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {bin}: {e} (is redis-server installed?)"))?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + START_LIMIT;
        let log_tail = || {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(10)..].join("\n")
        };
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("{bin} exited at start ({st}):\n{}", log_tail()));
            }
            if let Ok(con) = control(&addr) {
                return Ok(Self {
                    addr,
                    own: Some(child),
                    con,
                });
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{bin} did not answer PING on {addr} within {START_LIMIT:?}:\n{}",
                    log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A server someone else runs.
    pub fn external(addr: &str) -> Result<Self, String> {
        Ok(Self {
            addr: addr.to_owned(),
            own: None,
            con: control(addr)?,
        })
    }

    pub fn is_own(&self) -> bool {
        self.own.is_some()
    }

    pub fn host_port(&self) -> (String, u16) {
        let (h, p) = self.addr.rsplit_once(':').expect("validated host:port");
        (h.to_owned(), p.parse().expect("validated port"))
    }

    pub fn flushall(&mut self) -> Result<(), String> {
        redis::cmd("FLUSHALL")
            .arg("SYNC")
            .query::<()>(&mut self.con)
            .map_err(|e| format!("FLUSHALL: {e}"))
    }

    pub fn dbsize(&mut self) -> Result<u64, String> {
        redis::cmd("DBSIZE")
            .query(&mut self.con)
            .map_err(|e| format!("DBSIZE: {e}"))
    }

    /// `INFO section` as `field → value` text.
    fn info(&mut self, section: &str) -> Result<String, String> {
        redis::cmd("INFO")
            .arg(section)
            .query(&mut self.con)
            .map_err(|e| format!("INFO {section}: {e}"))
    }

    /// The server's own CPU time so far (user + sys of its main process), ns.
    pub fn cpu_ns(&mut self) -> Result<u64, String> {
        let info = self.info("cpu")?;
        let field = |name: &str| -> Result<f64, String> {
            info_field(&info, name)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| format!("INFO cpu has no {name}"))
        };
        let secs = field("used_cpu_user")? + field("used_cpu_sys")?;
        Ok((secs * 1e9) as u64)
    }

    /// `redis_version` and the `io-threads` setting, for the report.
    pub fn describe(&mut self) -> Result<(String, String), String> {
        let info = self.info("server")?;
        let version = info_field(&info, "redis_version")
            .unwrap_or("unknown")
            .to_owned();
        let threads = redis::cmd("CONFIG")
            .arg("GET")
            .arg("io-threads")
            .query::<Vec<String>>(&mut self.con)
            .ok()
            .and_then(|v| v.get(1).cloned())
            .unwrap_or_else(|| "?".to_owned());
        Ok((version, threads))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.own.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// A control connection that has answered PING.
fn control(addr: &str) -> Result<redis::Connection, String> {
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    // A plain connect first, so a closed port fails fast and quietly.
    TcpStream::connect_timeout(&sock, Duration::from_millis(500))
        .map_err(|e| format!("{addr}: {e}"))?;
    let client = redis::Client::open(format!("redis://{addr}/")).map_err(|e| e.to_string())?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .map_err(|e| format!("{addr}: {e}"))?;
    con.set_read_timeout(Some(CONTROL_TIMEOUT))
        .and_then(|()| con.set_write_timeout(Some(CONTROL_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    redis::cmd("PING")
        .query::<String>(&mut con)
        .map_err(|e| format!("{addr}: PING: {e}"))?;
    Ok(con)
}
