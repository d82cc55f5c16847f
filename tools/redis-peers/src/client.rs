//! The in-process peers, run inside a pinned child process: redis-rs
//! (`MultiplexedConnection`) and fred (one client, one connection), each on a
//! tokio current-thread runtime with `depth` tasks looping novel
//! `SET k v NX PX 60000` until `ops` in total.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use histogram::Histogram;

use crate::stats::{LatencySummary, new_histogram};

/// TTL of every claim, as txgate's default (60 s).
pub const TTL_MS: i64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lib {
    #[value(name = "redis-rs")]
    RedisRs,
    Fred,
}

/// Arguments of the hidden `__client` mode (the parent builds them).
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    lib: Lib,
    #[arg(long)]
    addr: String,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    depth: u64,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    ops: u64,
    /// Key prefix, unique per run, e.g. `txp:1a2b3c4d:`.
    #[arg(long)]
    prefix: String,
    /// Open-loop offered load in ops/s; latency from each op's scheduled send time.
    #[arg(long)]
    rate: Option<f64>,
    /// Where the result JSON goes.
    #[arg(long)]
    out: PathBuf,
}

/// Shared state of one run's tasks (one thread: `Rc`/`Cell`).
struct Run {
    prefix: String,
    ops: u64,
    value_prefix: String,
    issued: Cell<u64>,
    won: Cell<u64>,
    lost: Cell<u64>,
    errors: Cell<u64>,
    first_error: RefCell<Option<String>>,
    latency: RefCell<Histogram>,
    started: Instant,
    interval: Option<Duration>,
}

/// Entry point of the `__client` mode; the exit code tells the parent.
pub fn main(args: ClientArgs) -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("redis-peers client: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = tokio::task::LocalSet::new().block_on(&rt, run(&args));
    match result.and_then(|v| {
        std::fs::write(&args.out, v.to_string())
            .map_err(|e| format!("writing {}: {e}", args.out.display()))
    }) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redis-peers client ({:?}): {e}", args.lib);
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(a: &ClientArgs) -> Result<serde_json::Value, String> {
    match a.lib {
        Lib::RedisRs => {
            use redis::IntoConnectionInfo;
            let info = format!("redis://{}/", a.addr)
                .into_connection_info()
                .map_err(|e| e.to_string())?
                .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
            let client = redis::Client::open(info).map_err(|e| e.to_string())?;
            let con = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("connecting: {e}"))?;
            redis::cmd("PING")
                .query_async::<String>(&mut con.clone())
                .await
                .map_err(|e| format!("PING: {e}"))?;
            drive(a, move |key, value| {
                let mut con = con.clone();
                async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(value)
                        .arg("NX")
                        .arg("PX")
                        .arg(TTL_MS)
                        .query_async::<Option<String>>(&mut con)
                        .await
                        .map(|r| r.is_some())
                        .map_err(|e| e.to_string())
                }
            })
            .await
        }
        Lib::Fred => {
            use fred::prelude::*;
            use fred::types::{Expiration, SetOptions};
            let config =
                Config::from_url(&format!("redis://{}", a.addr)).map_err(|e| e.to_string())?;
            let client = Builder::from_config(config)
                .with_connection_config(|c| {
                    c.tcp = TcpConfig {
                        nodelay: Some(true),
                        ..Default::default()
                    };
                })
                .build()
                .map_err(|e| e.to_string())?;
            client
                .init()
                .await
                .map_err(|e| format!("connecting: {e}"))?;
            client
                .ping::<String>(None)
                .await
                .map_err(|e| format!("PING: {e}"))?;
            let c = client.clone();
            let out = drive(a, move |key, value| {
                let c = c.clone();
                async move {
                    c.set::<Option<String>, _, _>(
                        key,
                        value,
                        Some(Expiration::PX(TTL_MS)),
                        Some(SetOptions::NX),
                        false,
                    )
                    .await
                    .map(|r| r.is_some())
                    .map_err(|e| e.to_string())
                }
            })
            .await;
            let _ = client.quit().await;
            out
        }
    }
}

/// Runs `a.depth` tasks issuing `op(key, value)` until `a.ops` in total and
/// reports throughput, latency and this process's CPU over that phase.
async fn drive<F, Fut>(a: &ClientArgs, op: F) -> Result<serde_json::Value, String>
where
    F: Fn(String, String) -> Fut + Clone + 'static,
    Fut: Future<Output = Result<bool, String>> + 'static,
{
    let (user0, sys0) = crate::child::self_cpu_ns();
    let run = Rc::new(Run {
        prefix: a.prefix.clone(),
        ops: a.ops,
        value_prefix: format!("redis-peers-{}:0:", std::process::id()),
        issued: Cell::new(0),
        won: Cell::new(0),
        lost: Cell::new(0),
        errors: Cell::new(0),
        first_error: RefCell::new(None),
        latency: RefCell::new(new_histogram()),
        started: Instant::now(),
        interval: a
            .rate
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(1.0 / r)),
    });
    let tasks: Vec<_> = (0..a.depth)
        .map(|_| tokio::task::spawn_local(task(run.clone(), op.clone())))
        .collect();
    for t in tasks {
        t.await.map_err(|e| format!("task failed: {e}"))?;
    }
    let elapsed = run.started.elapsed();
    let (user1, sys1) = crate::child::self_cpu_ns();
    let done = run.won.get() + run.lost.get();
    let lat = LatencySummary::from_histogram(&run.latency.borrow());
    Ok(serde_json::json!({
        "ops": done,
        "won": run.won.get(),
        "lost": run.lost.get(),
        "errors": run.errors.get(),
        "first_error": *run.first_error.borrow(),
        "elapsed_ns": elapsed.as_nanos() as u64,
        "ops_per_sec": done as f64 / elapsed.as_secs_f64(),
        "latency": lat,
        "phase_user_ns": user1 - user0,
        "phase_sys_ns": sys1 - sys0,
    }))
}

/// One of the `depth` loops.
async fn task<F, Fut>(run: Rc<Run>, op: F)
where
    F: Fn(String, String) -> Fut,
    Fut: Future<Output = Result<bool, String>>,
{
    loop {
        let k = run.issued.get();
        if k >= run.ops {
            return;
        }
        run.issued.set(k + 1);
        let key = format!("{}{k:016x}", run.prefix);
        let value = format!("{}{k}", run.value_prefix);
        let t0 = match run.interval {
            Some(every) => {
                let due = run.started + every.mul_f64(k as f64);
                pace_until(due).await;
                due
            }
            None => Instant::now(),
        };
        let r = op(key, value).await;
        let ns = t0.elapsed().as_nanos() as u64;
        match r {
            Ok(won) => {
                let _ = run.latency.borrow_mut().increment(ns);
                let c = if won { &run.won } else { &run.lost };
                c.set(c.get() + 1);
            }
            Err(e) => {
                run.errors.set(run.errors.get() + 1);
                run.first_error.borrow_mut().get_or_insert(e);
            }
        }
    }
}

/// Waits until `due`. tokio's timers tick in whole milliseconds, so only the
/// part beyond 2 ms is slept; the rest is waited by yielding, which keeps
/// the send on time (and costs CPU: paced runs' CPU is not compared).
async fn pace_until(due: Instant) {
    const SLACK: Duration = Duration::from_micros(20);
    const TIMER_TICK: Duration = Duration::from_millis(2);
    loop {
        let now = Instant::now();
        if now + SLACK >= due {
            return;
        }
        let left = due - now;
        if left > TIMER_TICK + TIMER_TICK / 2 {
            tokio::time::sleep(left - TIMER_TICK).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}
