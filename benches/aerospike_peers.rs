//! txgate's Aerospike backend against the official Rust client, same server,
//! equal writes in flight: ops/s, p50/p99/p99.9 and client CPU per op.
//!
//! ```sh
//! cargo bench --bench aerospike_peers                        # our test server
//! cargo bench --bench aerospike_peers -- --hosts 10.0.0.5:3000 --namespace test
//! ```
//!
//! Without `--hosts` it starts txgate's protocol-level test server
//! (`tests/support/aerospike.rs`) in a child process (this program again, in
//! a hidden serve mode, pinned to `--server-core`), so the CPU it measures
//! with `getrusage(RUSAGE_SELF)` is the clients' alone; the child's CPU is
//! read from `/proc` and shown apart. The clients run in this process, pinned
//! to `--core`. See `aerospike_peers/peers.rs` for what each client runs.
//! At depth 1 it also runs a bare blocking client (one `TcpStream`, one
//! `write(2)` and blocking `read(2)` per write), the CPU floor of any client
//! that waits for each reply, so every report shows what depth 1 allows.
//! Prints a table and the issue's targets; writes everything, every run
//! included, to `target/aerospike-peers.json` (`--json`).

#[path = "../tests/support/aerospike.rs"]
#[allow(dead_code)]
mod aerospike_server;
#[path = "aerospike_peers/peers.rs"]
mod peers;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::Duration;

use clap::Parser;

use peers::{Client, Length, Plan};

#[derive(Parser, Debug)]
#[command(
    name = "aerospike_peers",
    about = "txgate's Aerospike backend vs the official Rust client: create-only writes, equal in flight"
)]
struct Cli {
    /// Seed nodes of the Aerospike cluster to measure against (HOST:PORT,...).
    /// Default: start our test server in a child process
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
    /// Namespace to write into
    #[arg(long, default_value = "test")]
    namespace: String,
    /// Set to write into (keys are unique per run; records expire after --ttl-s)
    #[arg(long, default_value = "txgate-peers")]
    set: String,
    /// Nodes of our test server (without --hosts)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    nodes: u64,
    /// Writes in flight, for both clients
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256",
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    depths: Vec<u64>,
    /// Writes per measured run at every depth [default: 20000 at depth 1, 100000 deeper]
    #[arg(long, conflicts_with = "seconds", value_parser = clap::value_parser!(u64).range(1..))]
    ops_per_depth: Option<u64>,
    /// Length of every measured run in seconds, instead of a write count
    #[arg(long)]
    seconds: Option<f64>,
    /// Writes before each measured run, same depth [default: max(1000, 8 x depth)]
    #[arg(long)]
    warmup_ops: Option<u64>,
    /// Runs of each (client, depth); the table shows medians
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    runs: u32,
    /// CPU the clients (this process) run on
    #[arg(long, default_value_t = 0)]
    core: usize,
    /// CPU our test server runs on (without --hosts)
    #[arg(long, default_value_t = 1)]
    server_core: usize,
    /// With --hosts: the PID of a server on this machine, whose CPU is then
    /// reported as for our test server (pin it to --server-core yourself)
    #[arg(long, requires = "hosts")]
    server_pid: Option<u32>,
    /// Pin nothing
    #[arg(long)]
    no_pin: bool,
    /// txgate's connections per node to run [default: 1 and the default of --aero-conns-per-node]
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=64))]
    txgate_conns: Vec<u64>,
    /// txgate's pauses before reading more replies to run, in microseconds
    /// (--aero-reply-gather; 0 reads at once) [default: the default of --aero-reply-gather]
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(0..=10_000))]
    txgate_gather_us: Vec<u64>,
    /// Skip the official client (txgate rows only)
    #[arg(long)]
    no_official: bool,
    /// Skip the blocking round-trip client, the CPU floor at depth 1 (it runs
    /// at depth 1 only)
    #[arg(long)]
    no_blocking: bool,
    /// The official client's tokio runtime: 0 = current-thread, N = multi-thread with N workers
    #[arg(long, default_value_t = 0)]
    official_workers: usize,
    /// Per-op deadline of every client, ms
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    op_timeout_ms: u64,
    /// Record TTL, s (0 = never expire; a server with nsup-period 0 refuses TTLs)
    #[arg(long, default_value_t = 60)]
    ttl_s: u32,
    /// Pause between two warm-up passes (ms), so connections whose SYN a busy listener
    /// dropped are up before measuring (0 = one warm-up pass)
    #[arg(long, default_value_t = 1200, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    settle_ms: u64,
    /// Before each run, wait up to this many seconds for the client and server CPUs to be
    /// quiet (for shared machines; 0 = don't)
    #[arg(long, default_value_t = 0.0)]
    quiet_wait_s: f64,
    /// Where the JSON goes [default: target/aerospike-peers.json, or under $CARGO_TARGET_DIR]
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored
    #[arg(long, hide = true)]
    bench: bool,
    /// Internal: serve our test server on stdout's ports until stdin closes
    #[arg(long, hide = true)]
    serve_test_server: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.serve_test_server {
        return serve(&cli);
    }
    match bench(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("aerospike_peers: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("aerospike_peers: {e}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Usage(String),
    Run(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Self::Run(e)
    }
}

/// Pins the calling thread (and every thread it starts later) to `core`.
fn pin_to(core: usize) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays in bounds because
    // `core` was checked against the CPU count; 0 = this thread.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(format!(
            "pinning to CPU {core}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// The hidden serve mode: our test server until stdin closes. Prints
/// `seeds HOST:PORT,...`; answers each `clear` line with `cleared`.
fn serve(cli: &Cli) -> ExitCode {
    if !cli.no_pin
        && let Err(e) = pin_to(cli.server_core)
    {
        eprintln!("aerospike_peers serve: {e}");
        return ExitCode::FAILURE;
    }
    let server = aerospike_server::AeroServer::start(cli.nodes as usize, &cli.namespace);
    let mut out = std::io::stdout().lock();
    if writeln!(out, "seeds {}", server.seeds().join(",")).is_err() || out.flush().is_err() {
        return ExitCode::FAILURE;
    }
    // Bounded by the parent: it closes stdin when done (or dies, and then
    // PR_SET_PDEATHSIG ends us).
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "clear" {
            server.clear();
            if writeln!(out, "cleared").is_err() || out.flush().is_err() {
                break;
            }
        }
    }
    ExitCode::SUCCESS
}

/// Our test server in a child process: this program in serve mode.
struct ServerChild {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    seeds: Vec<String>,
}

impl ServerChild {
    fn start(cli: &Cli) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "--serve-test-server",
            "--nodes",
            &cli.nodes.to_string(),
            "--namespace",
            &cli.namespace,
            "--server-core",
            &cli.server_core.to_string(),
        ]);
        if cli.no_pin {
            cmd.arg("--no-pin");
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        // SAFETY: runs between fork and exec; prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting the test server: {e}"))?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .map_err(|e| format!("reading the test server's ports: {e}"))?;
        let seeds: Vec<String> = line
            .trim()
            .strip_prefix("seeds ")
            .ok_or_else(|| format!("test server said {line:?}, not its seeds"))?
            .split(',')
            .map(str::to_owned)
            .collect();
        Ok(Self {
            child,
            stdin,
            stdout,
            seeds,
        })
    }

    /// Removes every record, so each run starts on the same store.
    fn clear(&mut self) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("server stdin closed")?;
        writeln!(stdin, "clear")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("asking the test server to clear: {e}"))?;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| format!("test server: {e}"))?;
        if line.trim() != "cleared" {
            return Err(format!("test server answered {line:?} to clear"));
        }
        Ok(())
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        drop(self.stdin.take());
        // It exits when stdin closes; a bounded wait, then a kill.
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bench(cli: Cli) -> Result<(), Failure> {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let own_server = cli.hosts.is_empty();
    if !cli.no_pin {
        for (flag, core) in [("--core", cli.core), ("--server-core", cli.server_core)] {
            if core >= cpus {
                return Err(Failure::Usage(format!(
                    "{flag} {core}: this machine has CPUs 0..={} (or pass --no-pin)",
                    cpus - 1
                )));
            }
        }
        if own_server && cli.core == cli.server_core {
            eprintln!(
                "aerospike_peers: warning: client and server share CPU {}",
                cli.core
            );
        }
    }
    if !(0.0..=3600.0).contains(&cli.quiet_wait_s) {
        return Err(Failure::Usage(format!(
            "--quiet-wait-s {}: expected 0..=3600",
            cli.quiet_wait_s
        )));
    }
    if let Some(s) = cli.seconds
        && !(s > 0.0 && s <= 3600.0)
    {
        return Err(Failure::Usage(format!(
            "--seconds {s}: expected 0 < s <= 3600"
        )));
    }
    if !own_server && cli.hosts.iter().any(|h| h.rsplit_once(':').is_none()) {
        return Err(Failure::Usage(format!(
            "--hosts {}: expected HOST:PORT,...",
            cli.hosts.join(",")
        )));
    }
    let default_conns = txgate::cache::Config::default().aero_conns_per_node;
    let mut conns: Vec<usize> = if cli.txgate_conns.is_empty() {
        vec![1, default_conns]
    } else {
        cli.txgate_conns.iter().map(|&n| n as usize).collect()
    };
    conns.sort_unstable();
    conns.dedup();
    let mut gathers: Vec<u64> = if cli.txgate_gather_us.is_empty() {
        vec![peers::default_gather_us()]
    } else {
        cli.txgate_gather_us.clone()
    };
    gathers.sort_unstable();
    gathers.dedup();
    let mut clients: Vec<Client> = conns
        .iter()
        .flat_map(|&n| {
            gathers.iter().map(move |&g| Client::Txgate {
                conns_per_node: n,
                gather_us: g,
            })
        })
        .collect();
    if !cli.no_official {
        clients.push(Client::Official);
    }
    if !cli.no_blocking {
        clients.push(Client::Blocking);
    }
    let mut depths: Vec<usize> = cli.depths.iter().map(|&d| d as usize).collect();
    depths.dedup();
    let length = match (cli.ops_per_depth, cli.seconds) {
        (_, Some(s)) => Length::Seconds(s),
        (Some(n), None) => Length::Ops {
            depth_1: n,
            deeper: n,
        },
        (None, None) => Length::Ops {
            depth_1: 20_000,
            deeper: 100_000,
        },
    };

    // The server first: its threads must not inherit the clients' CPU.
    let mut server = if own_server {
        Some(ServerChild::start(&cli)?)
    } else {
        None
    };
    if !cli.no_pin {
        pin_to(cli.core)?;
    }
    let hosts = match &server {
        Some(s) => s.seeds.clone(),
        None => cli.hosts.clone(),
    };
    let plan = Plan {
        hosts: hosts.clone(),
        namespace: cli.namespace.clone(),
        set: cli.set.clone(),
        clients,
        depths,
        length,
        warmup_ops: cli.warmup_ops,
        runs: cli.runs,
        core: (!cli.no_pin).then_some(cli.core),
        server_core: ((own_server && !cli.no_pin) || cli.server_pid.is_some())
            .then_some(cli.server_core),
        server_pid: server.as_ref().map(|s| s.child.id()).or(cli.server_pid),
        op_timeout: Duration::from_millis(cli.op_timeout_ms),
        ttl_s: cli.ttl_s,
        official_workers: cli.official_workers,
        default_conns,
        settle: Duration::from_millis(cli.settle_ms),
        quiet_wait: Duration::from_secs_f64(cli.quiet_wait_s),
        progress: true,
    };
    let server_desc = if own_server {
        format!(
            "txgate's protocol-level test server (tests/support/aerospike.rs: one thread per \
             connection, one mutex-guarded store), {} node(s) at {}, in a child process{}",
            cli.nodes,
            hosts.join(","),
            if cli.no_pin {
                String::new()
            } else {
                format!(" pinned to CPU {}", cli.server_core)
            }
        )
    } else {
        format!("external cluster, seeds {}", hosts.join(","))
    };
    let clients_json = peers::clients_json(&plan);
    eprintln!("aerospike_peers: {server_desc}");
    eprintln!("  txgate: {}", clients_json["txgate"]["version"]);
    eprintln!("  official: {}", clients_json["official"]["version"]);
    if !cli.no_blocking {
        eprintln!(
            "  blocking (depth 1): {}",
            clients_json["blocking"]["version"]
        );
    }
    eprintln!(
        "  clients {}; depths {:?}; {} runs each; namespace {}, set {}",
        match plan.core {
            Some(c) => format!("pinned to CPU {c}"),
            None => "unpinned".to_owned(),
        },
        plan.depths,
        plan.runs,
        plan.namespace,
        plan.set
    );

    let results = peers::run_all(&plan, || match server.as_mut() {
        Some(s) => s.clear(),
        None => Ok(()),
    })?;
    drop(server);

    let summary = peers::summarize(&results, default_conns);
    let targets = peers::targets(&summary, &plan.depths, default_conns);
    println!("\n{server_desc}");
    println!("  txgate: {}", clients_json["txgate"]["version"]);
    println!(
        "  official: {}, {}",
        clients_json["official"]["version"], clients_json["official"]["settings"]["runtime"]
    );
    if !cli.no_blocking {
        println!(
            "  blocking (depth 1): {}, one connection to the first seed",
            clients_json["blocking"]["version"]
        );
    }
    println!(
        "  clients on {}; medians of {} runs; {}\n",
        match plan.core {
            Some(c) => format!("CPU {c}"),
            None => "any CPU".to_owned(),
        },
        plan.runs,
        match plan.length {
            Length::Ops { depth_1, deeper } if depth_1 == deeper =>
                format!("{depth_1} writes per run"),
            Length::Ops { depth_1, deeper } =>
                format!("{depth_1} writes per run at depth 1, {deeper} deeper"),
            Length::Seconds(s) => format!("{s} s per run"),
        }
    );
    print!("{}", peers::table(&summary, &plan.depths));
    println!();
    print!("{}", peers::targets_text(&targets));
    let notes = peers::notes(&results, &summary);
    if !notes.is_empty() {
        println!("\nNotes:");
        for n in &notes {
            println!("  - {n}");
        }
    }
    println!(
        "\nCPU us/op: this process's user + sys (getrusage, all threads) over the measured \
         phase / writes. srv us/op: the server process's CPU (/proc, 10 ms ticks) / writes; \
         srv %: how busy the server's CPU was (near 100: the server is the ceiling). \
         other%: share of the client CPU that other processes took. Percentiles are exact \
         (every write's latency, successful writes)."
    );
    if !cli.no_blocking {
        println!(
            "blocking round trip (floor), depth 1 only: one blocking TcpStream to the first \
             seed, one write(2) and blocking read(2)s per write (txgate's codec), no routing \
             (the seed proxies): the least CPU a client can spend per op when each op waits \
             for its reply."
        );
    }
    if default_conns == 1 {
        println!(
            "txgate's default --aero-conns-per-node is 1, so the 1-conn and default rows are \
             the same configuration."
        );
    }

    let doc = peers::document(
        &plan,
        serde_json::json!({
            "description": server_desc,
            "ours": own_server,
            "nodes": own_server.then_some(cli.nodes),
            "seeds": hosts,
        }),
        &results,
        serde_json::json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "machine": {
                "cpus": cpus,
                "cpu_model": cpu_model(),
                "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
            },
            "txgate_git": git_rev(),
        }),
    );
    let path = cli.json.clone().unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
            .join("aerospike-peers.json")
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("\njson: {}", path.display());
    Ok(())
}

fn cpu_model() -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim().to_owned())
        })
}

/// `abc1234` or `abc1234 + local changes`, when run from a git checkout.
fn git_rev() -> Option<String> {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let rev = git(&["rev-parse", "--short", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--", "src", "Cargo.toml"]).is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{rev} + local changes")
    } else {
        rev
    })
}
