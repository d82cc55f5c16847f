//! The engine end to end: claims run on their owner shard from any thread or
//! shard, single-flight holds one backend call per TxID, a failing or stalled
//! backend fails open (and never holds up duplicates), a full tier-1 never
//! lies, backend ops reach the key's owner, and start/shutdown fail or finish
//! cleanly.
//!
//! Ordering is proven with flags and counters, never with elapsed time; the
//! only clocks here are generous guards that turn a hang into a failure.

mod support;

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::task::Poll;
use std::time::Duration;

use futures_lite::future::{block_on, poll_fn, poll_once, yield_now};
use txgate::cache::fault::{FaultBackend, FaultMode};
use txgate::cache::{self, Backend, BackendKind, Config};
use txgate::engine::{Engine, EngineConfig, EngineError, Op, Reply, Shard, affinity_cores};
use txgate::route::route;
use txgate::txidset::{ClaimCounters, Forward, Suppress, Verdict};

const WON: Verdict = Verdict::Forward(Forward::Won);
const FAIL_OPEN: Verdict = Verdict::Forward(Forward::FailOpen);
const SEEN: Verdict = Verdict::Suppress(Suppress::Seen);
const PENDING: Verdict = Verdict::Suppress(Suppress::Pending);

/// Bound on any wait for something that must happen (a hang guard, not a
/// performance assertion).
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Every shard's claim counters, by shard index.
fn counters(engine: &Engine) -> Vec<ClaimCounters> {
    block_on(engine.on_every_shard(|s: Rc<Shard>| async move { s.txids().counters() }))
        .expect("every shard answers")
}

/// The first `n` TxIDs from `from` on whose owner (of `shards`) `keep` agrees.
fn ids_where(from: u64, n: usize, shards: usize, keep: impl Fn(usize) -> bool) -> Vec<[u8; 16]> {
    let ids: Vec<[u8; 16]> = (from..from + 1_000 * n as u64)
        .map(support::txid)
        .filter(|id| keep(route(id, shards as u32) as usize))
        .take(n)
        .collect();
    assert_eq!(
        ids.len(),
        n,
        "the id generator is bounded and found too few ids"
    );
    ids
}

/// Polls every future until all are done, on this thread; results in order.
fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    block_on(poll_fn(|cx| {
        let mut done = true;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => done = false,
                }
            }
        }
        if done { Poll::Ready(()) } else { Poll::Pending }
    }));
    out.into_iter()
        .map(|o| o.expect("polled to completion"))
        .collect()
}

#[test]
fn claims_from_a_plain_thread_run_on_the_owner_shard() {
    const SHARDS: usize = 4;
    const N: usize = 2000;
    const THREADS: usize = 4;
    let engine = support::engine(SHARDS, None);
    let ids: Vec<[u8; 16]> = (0..N as u64).map(support::txid).collect();

    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (engine, ids) = (&engine, &ids);
            scope.spawn(move || {
                for id in ids.iter().skip(t).step_by(THREADS) {
                    assert_eq!(
                        engine.claim_blocking(id).expect("claim"),
                        WON,
                        "first copy of {id:?}"
                    );
                }
            });
        }
    });

    let mut want = [0u64; SHARDS];
    for id in &ids {
        let owner = route(id, SHARDS as u32) as usize;
        assert_eq!(engine.owner(id), owner, "engine.owner agrees with route");
        want[owner] += 1;
    }
    assert!(
        want.iter().all(|&w| w > 0),
        "every shard owns some of the ids: {want:?}"
    );
    let after_first = counters(&engine);
    for (shard, c) in after_first.iter().enumerate() {
        assert_eq!(
            c.won, want[shard],
            "shard {shard} won exactly the ids it owns"
        );
        assert_eq!(
            c.claims(),
            want[shard],
            "shard {shard} answered only its own ids"
        );
    }

    // Each id entered its owner's tier-1: a job on the owner sees it, and that
    // job runs on the owner.
    let mut sampled = [0u64; SHARDS];
    for id in ids.iter().step_by(10) {
        let owner = engine.owner(id);
        sampled[owner] += 1;
        let id = *id;
        let (ran_on, owner_there, v) = block_on(engine.run_on(owner, move |s| async move {
            (s.index(), s.owner(&id), s.txids().claim(&id).await)
        }))
        .expect("owner answers");
        assert_eq!(ran_on, owner, "run_on ran on the shard asked for");
        assert_eq!(owner_there, owner, "shards route like the engine");
        assert_eq!(v, SEEN, "{id:?} is in its owner's tier-1");
    }

    // Every copy from plain threads is now suppressed.
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (engine, ids) = (&engine, &ids);
            scope.spawn(move || {
                for id in ids.iter().skip(t).step_by(THREADS) {
                    assert_eq!(
                        engine.claim_blocking(id).expect("claim"),
                        SEEN,
                        "second copy of {id:?}"
                    );
                }
            });
        }
    });
    for (shard, c) in counters(&engine).iter().enumerate() {
        assert_eq!(c.won, want[shard], "shard {shard}: no new wins");
        assert_eq!(
            c.seen,
            want[shard] + sampled[shard],
            "shard {shard}: every later copy seen"
        );
    }
}

#[test]
fn claims_from_a_non_owner_shard_hop_to_the_owner() {
    const SHARDS: usize = 4;
    let engine = support::engine(SHARDS, None);
    let ids = ids_where(0, 300, SHARDS, |owner| owner != 0);
    let mut want = [0u64; SHARDS];
    for id in &ids {
        want[engine.owner(id)] += 1;
    }
    assert!(
        want[1..].iter().all(|&w| w > 0),
        "every other shard owns some: {want:?}"
    );

    let job_ids = ids.clone();
    let (ran_on, first, second, here) = block_on(engine.run_on(0, move |s| async move {
        let mut first = Vec::new();
        for id in &job_ids {
            first.push(s.claim(id).await.expect("hop"));
        }
        let mut second = Vec::new();
        for id in &job_ids {
            second.push(s.claim(id).await.expect("hop"));
        }
        (
            s.index(),
            first,
            second,
            (s.txids().counters(), s.txids().tier1_len()),
        )
    }))
    .expect("shard 0 answers");
    assert_eq!(ran_on, 0);
    assert!(
        first.iter().all(|&v| v == WON),
        "first copies win on their owners"
    );
    assert!(
        second.iter().all(|&v| v == SEEN),
        "second copies meet the owner's tier-1"
    );
    assert_eq!(
        here,
        (ClaimCounters::default(), 0),
        "shard 0 answered none of them itself"
    );

    let after = counters(&engine);
    assert_eq!(
        after[0],
        ClaimCounters::default(),
        "shard 0's counters never moved"
    );
    for shard in 1..SHARDS {
        assert_eq!(
            after[shard].won, want[shard],
            "shard {shard} won its own ids"
        );
        assert_eq!(
            after[shard].seen, want[shard],
            "shard {shard} saw their copies"
        );
    }
}

#[test]
fn single_flight_one_backend_call_for_100_concurrent_claims() {
    const COPIES: usize = 100;
    let fault = FaultBackend::new(Duration::from_millis(500));
    fault.set_delay(Duration::from_millis(20));
    let engine = support::engine(2, Some(Backend::Fault(fault.clone())));

    // 100 tasks on the owner shard, all spawned before any runs: the first
    // claim is in its backend call (a timer) while the other 99 run.
    let id = support::txid(42);
    let owner = engine.owner(&id);
    let (verdicts, c) = block_on(engine.run_on(owner, move |s| async move {
        let tasks: Vec<_> = (0..COPIES)
            .map(|_| {
                let s = s.clone();
                glommio::spawn_local(async move { s.txids().claim(&id).await })
            })
            .collect();
        let mut out = Vec::with_capacity(COPIES);
        for t in tasks {
            out.push(t.await);
        }
        (out, s.txids().counters())
    }))
    .expect("owner answers");
    assert_eq!(
        verdicts.iter().filter(|&&v| v == WON).count(),
        1,
        "{verdicts:?}"
    );
    assert_eq!(
        verdicts.iter().filter(|&&v| v == PENDING).count(),
        COPIES - 1,
        "{verdicts:?}"
    );
    assert_eq!(fault.set_nx_calls(), 1, "one backend call for 100 copies");
    assert_eq!(
        (c.won, c.pending, c.backend_calls),
        (1, COPIES as u64 - 1, 1)
    );
    assert_eq!(engine.claim_blocking(&id).expect("claim"), SEEN);
    assert_eq!(fault.set_nx_calls(), 1, "a later copy stops at tier-1");

    // The same from plain threads through the engine: 10 threads, each with
    // 10 claims in flight at once.
    const THREADS: usize = 10;
    let id = support::txid(43);
    let owner = engine.owner(&id);
    let calls_before = fault.set_nx_calls();
    let before = counters(&engine)[owner];
    let start = Barrier::new(THREADS);
    let verdicts: Vec<Verdict> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (engine, start) = (&engine, &start);
                scope.spawn(move || {
                    start.wait();
                    join_all((0..COPIES / THREADS).map(|_| engine.claim(&id)).collect())
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("claimant thread"))
            .map(|r| r.expect("claim"))
            .collect()
    });
    assert_eq!(verdicts.len(), COPIES);
    assert_eq!(
        verdicts.iter().filter(|v| v.is_forward()).count(),
        1,
        "{verdicts:?}"
    );
    assert_eq!(
        verdicts.iter().filter(|&&v| v == WON).count(),
        1,
        "{verdicts:?}"
    );
    assert!(
        verdicts
            .iter()
            .all(|&v| v == WON || v == PENDING || v == SEEN),
        "{verdicts:?}"
    );
    assert_eq!(
        fault.set_nx_calls(),
        calls_before + 1,
        "one backend call for 100 copies"
    );
    let after = counters(&engine)[owner];
    assert_eq!(after.backend_calls, before.backend_calls + 1);
    assert_eq!(after.claims(), before.claims() + COPIES as u64);
}

#[test]
fn backend_errors_fail_open_and_are_counted() {
    let fault = FaultBackend::new(Duration::from_millis(500));
    let engine = support::engine(2, Some(Backend::Fault(fault.clone())));
    fault.set_mode(FaultMode::Error);

    let ids: Vec<[u8; 16]> = (0..10).map(support::txid).collect();
    let before = counters(&engine);
    for id in &ids {
        assert_eq!(
            engine.claim_blocking(id).expect("claim"),
            FAIL_OPEN,
            "novel {id:?}"
        );
    }
    assert_eq!(
        fault.set_nx_calls(),
        ids.len() as u64,
        "each novel id tried the backend"
    );
    let mid = counters(&engine);
    for shard in 0..2 {
        let owned = ids.iter().filter(|id| engine.owner(*id) == shard).count() as u64;
        let (b, m) = (before[shard], mid[shard]);
        assert_eq!(m.fail_open, b.fail_open + owned, "shard {shard}");
        assert_eq!(m.backend_errors, b.backend_errors + owned, "shard {shard}");
        assert_eq!(
            m.backend_timeouts, b.backend_timeouts,
            "an error is not a timeout"
        );
        assert_eq!(m.backend_calls, b.backend_calls + owned, "shard {shard}");
        assert_eq!(m.won, b.won, "shard {shard}: nothing won");
    }

    // The fail-open outcome entered tier-1: copies stop there, backend untouched.
    for id in &ids {
        assert_eq!(
            engine.claim_blocking(id).expect("claim"),
            SEEN,
            "copy of {id:?}"
        );
    }
    assert_eq!(
        fault.set_nx_calls(),
        ids.len() as u64,
        "copies never reach the backend"
    );
    let after = counters(&engine);
    for shard in 0..2 {
        assert_eq!(after[shard].fail_open, mid[shard].fail_open);
        assert_eq!(after[shard].backend_errors, mid[shard].backend_errors);
    }
}

#[test]
fn stalled_backend_fails_open_at_the_op_timeout_while_duplicates_keep_flowing() {
    const X_COPIES: usize = 1000;
    let fault = FaultBackend::new(Duration::from_millis(300));
    let engine = support::engine(2, Some(Backend::Fault(fault.clone())));
    let x = support::txid(1000);
    let owner = engine.owner(&x);
    let same = ids_where(1001, 2, 2, |o| o == owner);
    let (y, y2) = (same[0], same[1]);

    assert_eq!(
        engine.claim_blocking(&x).expect("claim"),
        WON,
        "X claimed while healthy"
    );
    fault.set_mode(FaultMode::Stall);

    // On the owner: Y's claim stalls in the backend while X's copies run.
    let (y_in_flight, x_verdicts, y_done_after_x, y_verdict, y_done_at_end, c) =
        block_on(engine.run_on(owner, move |s| async move {
            let calls_before = s.txids().counters().backend_calls;
            let y_done = Rc::new(Cell::new(false));
            let y_task = {
                let (s, y_done) = (s.clone(), y_done.clone());
                glommio::spawn_local(async move {
                    let v = s.txids().claim(&y).await;
                    y_done.set(true);
                    v
                })
            };
            for _ in 0..1000 {
                if s.txids().counters().backend_calls > calls_before {
                    break;
                }
                yield_now().await;
            }
            let y_in_flight =
                s.txids().counters().backend_calls == calls_before + 1 && !y_done.get();
            let mut x_verdicts = Vec::with_capacity(X_COPIES);
            for i in 0..X_COPIES {
                x_verdicts.push(s.txids().claim(&x).await);
                if i % 100 == 99 {
                    // Let the executor turn over: Y is still parked.
                    yield_now().await;
                }
            }
            let y_done_after_x = y_done.get();
            let y_verdict = y_task.await;
            (
                y_in_flight,
                x_verdicts,
                y_done_after_x,
                y_verdict,
                y_done.get(),
                s.txids().counters(),
            )
        }))
        .expect("owner answers");
    assert!(
        y_in_flight,
        "Y's claim reached the stalled backend and is pending"
    );
    assert!(
        x_verdicts.iter().all(|&v| v == SEEN),
        "X's copies are seen: {x_verdicts:?}"
    );
    assert!(
        !y_done_after_x,
        "every X copy was answered while Y was still pending"
    );
    assert_eq!(y_verdict, FAIL_OPEN, "the stalled claim fails open");
    assert!(y_done_at_end);
    assert_eq!(
        (c.fail_open, c.backend_errors, c.backend_timeouts),
        (1, 1, 1)
    );
    assert_eq!(c.seen, X_COPIES as u64);

    // From a plain thread too: the shard keeps serving its inbox while a
    // claim stalls.
    let calls_before = fault.set_nx_calls();
    let y2_done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let flag = y2_done.clone();
    block_on(engine.run_on(owner, move |s| async move {
        glommio::spawn_local(async move {
            let v = s.txids().claim(&y2).await;
            flag.store(true, Ordering::SeqCst);
            let _ = tx.send(v);
        })
        .detach();
    }))
    .expect("owner answers");
    for _ in 0..10_000 {
        if fault.set_nx_calls() > calls_before {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        fault.set_nx_calls(),
        calls_before + 1,
        "Y2 reached the backend"
    );
    for _ in 0..5 {
        assert_eq!(engine.claim_blocking(&x).expect("claim"), SEEN);
    }
    assert!(
        !y2_done.load(Ordering::SeqCst),
        "X's copies from a thread were answered while Y2 was pending"
    );
    assert_eq!(rx.recv_timeout(HANG_GUARD).expect("Y2 finishes"), FAIL_OPEN);
    let c = counters(&engine)[owner];
    assert_eq!((c.fail_open, c.backend_timeouts), (2, 2));
}

#[test]
fn a_full_tier1_never_reports_a_novel_txid_as_seen() {
    const PER_SHARD: usize = 500_000;
    const CAPACITY: usize = 10_000;
    const RECENT: usize = 100;
    let engine = support::engine_with(2, None, |cfg| cfg.txidset.tier1_capacity = CAPACITY);
    let reports = block_on(engine.on_every_shard(|s: Rc<Shard>| async move {
        let me = s.index();
        let (mut claimed, mut suppressed) = (0usize, 0usize);
        let mut recent = Vec::with_capacity(RECENT);
        let bound = 8 * PER_SHARD as u64 * s.shards() as u64;
        let mut i = 0u64;
        while claimed < PER_SHARD && i < bound {
            let id = support::txid(i);
            i += 1;
            if s.owner(&id) != me {
                continue;
            }
            if !s.txids().claim(&id).await.is_forward() {
                suppressed += 1;
            }
            claimed += 1;
            if claimed > PER_SHARD - RECENT {
                recent.push(id);
            }
        }
        let tier1_len = s.txids().tier1_len();
        let mut recent_seen = 0;
        for id in &recent {
            recent_seen += (s.txids().claim(id).await == SEEN) as usize;
        }
        (
            claimed,
            suppressed,
            tier1_len,
            recent_seen,
            s.txids().counters(),
        )
    }))
    .expect("every shard answers");

    let mut total = 0;
    for (shard, (claimed, suppressed, tier1_len, recent_seen, c)) in reports.into_iter().enumerate()
    {
        assert_eq!(claimed, PER_SHARD, "shard {shard} claimed its share");
        assert_eq!(suppressed, 0, "shard {shard} suppressed a novel TxID");
        assert_eq!(c.won, PER_SHARD as u64, "shard {shard}");
        assert_eq!(
            tier1_len, CAPACITY,
            "shard {shard}: tier-1 is full and bounded (it evicted)"
        );
        assert_eq!(
            recent_seen, RECENT,
            "shard {shard}: tier-1 still remembers the newest ids"
        );
        total += claimed;
    }
    assert!(total >= 1_000_000);
}

#[test]
fn wrong_length_txid_is_an_error_not_a_panic() {
    let engine = support::engine(2, None);
    for len in [0usize, 15, 17] {
        let id = vec![1u8; len];
        let r = engine.claim_blocking(&id);
        assert!(
            matches!(r, Err(EngineError::TxIdLen { got, want: 16 }) if got == len),
            "claim_blocking of {len} bytes: {r:?}"
        );
        let r = block_on(engine.claim(&id));
        assert!(
            matches!(r, Err(EngineError::TxIdLen { .. })),
            "claim of {len} bytes: {r:?}"
        );
        for shard in 0..2 {
            let id = id.clone();
            let r = block_on(engine.run_on(shard, move |s| async move { s.claim(&id).await }))
                .expect("shard answers");
            assert!(
                matches!(r, Err(EngineError::TxIdLen { got, want: 16 }) if got == len),
                "Shard::claim of {len} bytes on shard {shard}: {r:?}"
            );
        }
    }
    // No shard panicked: both still claim.
    for id in ids_where(0, 1, 2, |o| o == 0)
        .into_iter()
        .chain(ids_where(0, 1, 2, |o| o == 1))
    {
        assert_eq!(engine.claim_blocking(&id).expect("claim"), WON);
    }
    let msg = EngineError::TxIdLen { got: 15, want: 16 }.to_string();
    assert!(msg.contains("15") && msg.contains("16"), "{msg}");
}

#[test]
fn backend_ops_from_any_thread_reach_the_key_owner() {
    const SHARDS: usize = 4;
    let backend = cache::open(&Config {
        backend: BackendKind::Memory,
        ..Config::default()
    })
    .expect("memory opens");
    let engine = support::engine(SHARDS, backend);

    // One key per owner shard.
    let mut keys: Vec<Vec<u8>> = vec![Vec::new(); SHARDS];
    for i in 0..10_000u32 {
        let key = format!("engine-test:key:{i}").into_bytes();
        let owner = engine.owner(&key);
        if keys[owner].is_empty() {
            keys[owner] = key;
        }
        if keys.iter().all(|k| !k.is_empty()) {
            break;
        }
    }
    assert!(keys.iter().all(|k| !k.is_empty()), "a key for every shard");

    for (owner, key) in keys.iter().enumerate() {
        let val = format!("value-{owner}").into_bytes();
        let reply = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    engine.op_blocking(
                        key,
                        Op::Set {
                            key: key.clone(),
                            val: val.clone(),
                            ttl: Duration::from_secs(60),
                        },
                    )
                })
                .join()
                .expect("setter thread")
        });
        assert_eq!(reply.expect("set"), Reply::Set);

        // Every shard reads it through Shard::op.
        let k = key.clone();
        let seen = block_on(engine.on_every_shard(move |s: Rc<Shard>| {
            let key = k.clone();
            async move { s.op(&key, Op::Get { key: key.clone() }).await.expect("get") }
        }))
        .expect("every shard answers");
        for (shard, r) in seen.iter().enumerate() {
            assert_eq!(
                r,
                &Reply::Get(Some(val.clone())),
                "shard {shard} reads key of shard {owner}"
            );
        }

        // It lives in the owner's partition only: the set ran on the owner.
        let k = key.clone();
        let held = block_on(engine.on_every_shard(move |s: Rc<Shard>| {
            let key = k.clone();
            async move {
                let b = s.backend().expect("memory backend").clone();
                b.get(&key).await.expect("direct get").is_some()
            }
        }))
        .expect("every shard answers");
        let want: Vec<bool> = (0..SHARDS).map(|s| s == owner).collect();
        assert_eq!(held, want, "only shard {owner}'s partition holds its key");

        // A delete from a non-owner shard reaches the owner too.
        let (k, from) = (key.clone(), (owner + 1) % SHARDS);
        let del = block_on(engine.run_on(from, move |s| async move {
            s.op(&k, Op::Del { key: k.clone() }).await
        }))
        .expect("shard answers");
        assert_eq!(del.expect("del"), Reply::Del);
        let gone = engine.op_blocking(key, Op::Get { key: key.clone() });
        assert_eq!(gone.expect("get"), Reply::Get(None), "deleted on the owner");
    }
}

/// Starts an engine on another thread, so a hang fails the test instead of
/// stalling it; a started engine is shut down there.
fn start_guarded(config: EngineConfig) -> Result<(), (String, Option<(usize, usize)>)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = match Engine::start(config) {
            Ok(e) => {
                e.shutdown().expect("shutdown");
                Ok(())
            }
            Err(e) => {
                let at = match &e {
                    EngineError::Start { shard, core, .. } => Some((*shard, *core)),
                    _ => None,
                };
                Err((e.to_string(), at))
            }
        };
        let _ = tx.send(r);
    });
    rx.recv_timeout(HANG_GUARD)
        .expect("Engine::start returned (no hang, no panic)")
}

#[test]
fn start_fails_closed_with_a_clear_error_on_a_bad_core() {
    let base = EngineConfig {
        txidset: txgate::txidset::TxIdSetConfig {
            tier1_capacity: 1000,
            instance_id: "test".into(),
            ..Default::default()
        },
        ..Default::default()
    };

    let (msg, at) = start_guarded(EngineConfig {
        cores: vec![100_000],
        ..base.clone()
    })
    .expect_err("core 100000 does not exist");
    assert_eq!(at, Some((0, 100_000)), "{msg}");
    assert!(
        msg.contains("shard 0") && msg.contains("core 100000"),
        "{msg}"
    );

    // A CPU just past the machine's, after a good one: shard 1 is named and
    // the started shard 0 is stopped (the call returns).
    // SAFETY: sysconf has no preconditions.
    let configured = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    assert!(configured > 0, "sysconf");
    let beyond = configured as usize;
    let good = affinity_cores().expect("affinity")[0];
    let (msg, at) = start_guarded(EngineConfig {
        cores: vec![good, beyond],
        ..base.clone()
    })
    .expect_err("a CPU beyond the machine");
    assert_eq!(at, Some((1, beyond)), "{msg}");
    assert!(
        msg.contains("shard 1") && msg.contains(&format!("core {beyond}")),
        "{msg}"
    );

    // The same config with good cores starts.
    start_guarded(EngineConfig {
        cores: vec![good, good],
        ..base
    })
    .expect("good cores start");
}

#[test]
fn shutdown_returns_and_later_calls_report_a_stopped_shard() {
    let engine = support::engine(2, None);
    let id_of_1 = ids_where(0, 1, 2, |o| o == 1)[0];

    // Shard 1's thread raises a flag as it exits (a thread-local destructor:
    // after its executor, and so its inbox, are gone).
    let shard1_exited = Arc::new(AtomicBool::new(false));
    let flag = shard1_exited.clone();
    block_on(engine.run_on(1, move |_| async move {
        EXIT_FLAG.with(|f| *f.borrow_mut() = Some(SetOnDrop(flag)));
    }))
    .expect("shard 1 answers");

    // A job on shard 0 that, once shard 1 has exited, claims a TxID of
    // shard 1 and reports what it got.
    let (got_tx, got_rx) = mpsc::channel();
    let watcher_started = Arc::new(AtomicBool::new(false));
    let (started, exited) = (watcher_started.clone(), shard1_exited.clone());
    let watcher = engine.run_on(0, move |s| async move {
        started.store(true, Ordering::SeqCst);
        assert_eq!(s.claim(&id_of_1).await.expect("shard 1 is up"), WON);
        for _ in 0..100_000 {
            if exited.load(Ordering::SeqCst) {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        let _ = got_tx.send((exited.load(Ordering::SeqCst), s.claim(&id_of_1).await));
    });
    // Submit without awaiting the reply: the job runs on, unowned.
    assert!(
        block_on(poll_once(watcher)).is_none(),
        "the watcher runs until shutdown"
    );
    for _ in 0..10_000 {
        if watcher_started.load(Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        watcher_started.load(Ordering::SeqCst),
        "the watcher started"
    );

    // A short job in flight at shutdown gets its grace and finishes.
    let short_done = Arc::new(AtomicBool::new(false));
    {
        let done = short_done.clone();
        let short = engine.run_on(1, move |_| async move {
            glommio::timer::sleep(Duration::from_millis(20)).await;
            done.store(true, Ordering::SeqCst);
        });
        assert!(block_on(poll_once(short)).is_none());
    }

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(engine.shutdown().map_err(|e| e.to_string()));
    });
    let r = rx.recv_timeout(HANG_GUARD).expect("shutdown returns");
    assert_eq!(r, Ok(()), "shutdown is clean");
    assert!(
        short_done.load(Ordering::SeqCst),
        "a short in-flight job finished within the grace"
    );
    assert!(
        shard1_exited.load(Ordering::SeqCst),
        "shard 1's thread exited"
    );

    let (exited_first, r) = got_rx
        .recv_timeout(HANG_GUARD)
        .expect("the watcher reported");
    assert!(
        exited_first,
        "the watcher saw shard 1 exit before its last claim"
    );
    let e = r.expect_err("a claim on a stopped shard fails");
    assert!(matches!(e, EngineError::ShardStopped(1)), "{e:?}");
    assert!(e.to_string().contains("shard 1"), "{e}");
}

thread_local! {
    static EXIT_FLAG: std::cell::RefCell<Option<SetOnDrop>> = const { std::cell::RefCell::new(None) };
}

/// Sets its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Reports, when its shard thread exits, how many strong references to the
/// shard are left.
struct ShardProbe(std::rc::Weak<Shard>, mpsc::Sender<usize>);

impl Drop for ShardProbe {
    fn drop(&mut self) {
        let _ = self.1.send(self.0.strong_count());
    }
}

thread_local! {
    static SHARD_PROBE: std::cell::RefCell<Option<ShardProbe>> = const { std::cell::RefCell::new(None) };
}

#[test]
fn shutdown_frees_shard_state_and_drops_jobs_past_the_grace() {
    let engine = support::engine(1, None);

    // A probe on the shard's thread, read at thread exit: by then nothing may
    // still hold the shard (its tier-1, backend partition, frame store).
    let (probe_tx, probe_rx) = mpsc::channel();
    block_on(engine.run_on(0, move |s| async move {
        SHARD_PROBE.with(|p| *p.borrow_mut() = Some(ShardProbe(Rc::downgrade(&s), probe_tx)));
    }))
    .expect("shard answers");

    // A job far past the grace, holding the shard: it must be dropped (its
    // caller would then see ShardStopped), not leaked.
    let (started, done, dropped) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    {
        let (started, done, dropped) = (started.clone(), done.clone(), dropped.clone());
        let long = engine.run_on(0, move |s| async move {
            let _guard = SetOnDrop(dropped);
            started.store(true, Ordering::SeqCst);
            glommio::timer::sleep(Duration::from_secs(120)).await;
            done.store(s.index() == 0, Ordering::SeqCst);
        });
        assert!(block_on(poll_once(long)).is_none());
    }
    for _ in 0..10_000 {
        if started.load(Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(started.load(Ordering::SeqCst), "the long job started");

    // shutdown joins the shard thread, thread-local destructors included.
    engine.shutdown().expect("shutdown is clean");
    assert!(!done.load(Ordering::SeqCst), "the long job was not awaited");
    let left = probe_rx
        .recv_timeout(HANG_GUARD)
        .expect("the shard thread exited");
    let dropped = dropped.load(Ordering::SeqCst);
    assert!(
        dropped && left == 0,
        "after shutdown: job past the grace dropped: {dropped} (want true); \
         references to the shard left: {left} (want 0)"
    );
}

/// Shutdown returns even when a shard's job slots are all taken by jobs
/// that never end and its inbox is full behind them: the stop signal does
/// not queue behind jobs. Until the fix, the stop waited in the full inbox
/// and the shard's loop waited for a job slot, forever.
#[test]
fn shutdown_returns_with_every_job_slot_taken_and_the_inbox_full() {
    let engine = support::engine_with(1, None, |c| {
        c.jobs_max = 1;
        c.inbox_capacity = 1;
    });
    // One job holds the only slot forever; the next waits for a slot; the
    // third fills the inbox. Submitted without awaiting their replies.
    for _ in 0..3 {
        let job = engine.run_on(0, |_| futures_lite::future::pending::<()>());
        assert!(block_on(poll_once(job)).is_none());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(engine.shutdown());
    });
    let stopped = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("shutdown returned");
    assert!(stopped.is_ok(), "{stopped:?}");
}

/// A shard whose thread dies of a panic leaves its tasks, the inbox's
/// receiver among them, leaked rather than dropped: a later call must still
/// get `ShardStopped`, not wait for ever.
#[test]
fn a_call_to_a_shard_whose_thread_panicked_fails_instead_of_hanging() {
    let engine = Arc::new(support::engine(1, None));
    // Panics on a later poll, from a timer: the thread unwinds out of the
    // runtime with this job's task (and the shard's loop) still queued.
    let e = engine.clone();
    let first = std::thread::spawn(move || {
        block_on(e.run_on(0, |_| async {
            glommio::timer::sleep(Duration::from_millis(200)).await;
            panic!("a shard job panics (on purpose, in a test)");
        }))
    });
    assert!(matches!(
        first.join().unwrap(),
        Err(EngineError::ShardStopped(0))
    ));
    let (tx, rx) = mpsc::channel();
    let e = engine.clone();
    std::thread::spawn(move || {
        let _ = tx.send(e.op_blocking(b"k", Op::Get { key: b"k".to_vec() }));
    });
    let later = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a call to the dead shard returned");
    assert!(
        matches!(later, Err(EngineError::ShardStopped(0))),
        "{later:?}"
    );
}
