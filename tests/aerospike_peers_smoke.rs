//! The peer benchmark (`benches/aerospike_peers.rs`) at toy scale, so CI
//! runs its measuring code: txgate and the official client at every depth
//! and the blocking floor at depth 1 against our test server, every write
//! created, none failed, and a report with every row.

mod support;

#[path = "../benches/aerospike_peers/peers.rs"]
#[allow(dead_code)]
mod peers;

use std::time::Duration;

use peers::{Client, Length, Plan};
use support::aerospike::AeroServer;

const NS: &str = "test";
const DEPTHS: [usize; 4] = [1, 16, 64, 256];
const OPS: u64 = 300;
const WARMUP_OPS: u64 = 300;

#[test]
fn both_clients_write_every_op_at_every_depth_and_the_report_names_each_row() {
    let server = AeroServer::start(3, NS);
    let clients = vec![
        Client::Txgate {
            conns_per_node: 1,
            gather_us: peers::default_gather_us(),
        },
        Client::Txgate {
            conns_per_node: 2,
            gather_us: 0,
        },
        Client::Official,
        Client::Blocking,
    ];
    let plan = Plan {
        hosts: server.seeds(),
        namespace: NS.to_owned(),
        set: "peers-smoke".to_owned(),
        clients: clients.clone(),
        depths: DEPTHS.to_vec(),
        length: Length::Ops {
            depth_1: OPS,
            deeper: OPS,
        },
        warmup_ops: Some(WARMUP_OPS),
        runs: 1,
        core: None,
        server_core: None,
        server_pid: None,
        op_timeout: Duration::from_secs(5),
        ttl_s: 60,
        official_workers: 0,
        default_conns: 1,
        settle: Duration::ZERO,
        quiet_wait: Duration::ZERO,
        progress: false,
    };
    // The server's counters before each run, to tell the runs' requests
    // apart: (proxied, record requests per node).
    let counters = |s: &AeroServer| {
        let per_node: Vec<u64> = (0..s.nodes()).map(|i| s.requests_to(i)).collect();
        (s.proxied(), per_node)
    };
    let mut before_each = Vec::new();
    let results = peers::run_all(&plan, || {
        before_each.push(counters(&server));
        Ok(())
    })
    .expect("every run completes");
    before_each.push(counters(&server));
    // Every client at every depth, but the blocking floor at depth 1 only.
    let routed = clients.iter().filter(|c| **c != Client::Blocking).count();
    let rows = routed * DEPTHS.len() + 1;
    assert_eq!(before_each.len(), rows + 1);
    assert_eq!(results.len(), rows);

    // Every write of every run reached the server as a new record, warm-ups
    // included: keys are unique per run and create-only.
    assert_eq!(
        server.live_records() as u64,
        rows as u64 * (OPS + WARMUP_OPS)
    );
    for (i, r) in results.iter().enumerate() {
        let ((p0, n0), (p1, n1)) = (&before_each[i], &before_each[i + 1]);
        let proxied = p1 - p0;
        let per_node: Vec<u64> = n1.iter().zip(n0).map(|(a, b)| a - b).collect();
        // txgate's open writes and deletes one probe record (does the
        // namespace take TTLs?): two requests more per run.
        let probe = if r.client.starts_with("txgate") { 2 } else { 0 };
        assert_eq!(
            per_node.iter().sum::<u64>(),
            OPS + WARMUP_OPS + probe,
            "{} depth {}: {per_node:?}",
            r.client,
            r.depth
        );
        if r.client == Client::Blocking.id() {
            // All to the first seed, which serves (proxies) the partitions
            // the other nodes master.
            assert_eq!(per_node[0], OPS + WARMUP_OPS, "{per_node:?}");
            assert!(proxied > 0 && proxied < OPS + WARMUP_OPS, "{proxied}");
        } else {
            assert_eq!(
                proxied, 0,
                "{} depth {}: txgate and the official client route to partition masters",
                r.client, r.depth
            );
        }
    }

    // The floor ran at depth 1, wrote every op as a new record, and was
    // measured; and nowhere deeper.
    let floor: Vec<&peers::RunResult> = results
        .iter()
        .filter(|r| r.client == Client::Blocking.id())
        .collect();
    assert_eq!(floor.len(), 1, "{floor:?}");
    let f = floor[0];
    assert_eq!(f.depth, 1, "{f:?}");
    assert_eq!(f.ops, OPS, "{f:?}");
    assert_eq!(f.created, f.ops, "{f:?}");
    assert_eq!((f.errors, f.exists, f.warmup_errors), (0, 0, 0), "{f:?}");
    assert_eq!(f.warmup_ops, WARMUP_OPS, "{f:?}");
    assert!(f.first_error.is_none(), "{f:?}");
    assert!(f.cpu_ns_per_op > 0.0 && f.ops_per_sec > 0.0, "{f:?}");
    assert!(f.p50_ns > 0 && f.p50_ns <= f.p999_ns, "{f:?}");
    assert!(
        !results
            .iter()
            .any(|r| r.client == Client::Blocking.id() && r.depth != 1),
        "the floor runs at depth 1 only"
    );

    let doc = peers::document(
        &plan,
        serde_json::json!({}),
        &results,
        serde_json::json!({}),
    );
    let text = serde_json::to_string(&doc).expect("the report serializes");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let summary = doc["summary"].as_array().expect("summary rows");
    assert_eq!(summary.len(), rows);
    for client in &clients {
        for depth in DEPTHS {
            if !client.runs_at(depth) {
                assert!(
                    !summary
                        .iter()
                        .any(|r| r["client"] == client.id() && r["depth"] == depth),
                    "{} has a row at depth {depth}",
                    client.id()
                );
                continue;
            }
            let row = summary
                .iter()
                .find(|r| r["client"] == client.id() && r["depth"] == depth)
                .unwrap_or_else(|| panic!("no row for {} at depth {depth}", client.id()));
            assert_eq!(row["ops"], OPS, "{row}");
            assert!(row["conns_per_node"].is_null() == !matches!(client, Client::Txgate { .. }));
            assert_eq!(row["errors"], 0, "{row}");
            assert_eq!(row["exists"], 0, "{row}");
            for field in [
                "ops_per_sec",
                "p50_ns",
                "p99_ns",
                "p999_ns",
                "cpu_us_per_op",
            ] {
                assert!(
                    row[field].as_f64().is_some_and(|v| v > 0.0),
                    "{field} of {row}"
                );
            }
            assert!(row["p50_ns"].as_f64() <= row["p999_ns"].as_f64(), "{row}");
        }
    }
    let run = doc["results"]
        .as_array()
        .and_then(|r| r.first())
        .expect("runs");
    assert_eq!(run["created"], OPS, "{run}");
    assert!(run["first_error"].is_null(), "{run}");
    assert!(
        doc["clients"]["official"]["version"]
            .as_str()
            .is_some_and(|v| v.contains("aerospike-core 3.")),
        "{}",
        doc["clients"]
    );
    assert_eq!(
        doc["clients"]["blocking"]["version"], "std::net::TcpStream, txgate codec",
        "{}",
        doc["clients"]
    );
    assert_eq!(doc["clients"]["blocking"]["in_this_run"], true);
    // Every target is computable from these rows (whatever it says at toy
    // scale on a shared machine), and the floor line has its figures.
    let targets = doc["targets"].as_array().expect("targets");
    let (info, verdicts): (Vec<_>, Vec<_>) =
        targets.iter().partition(|t| t["informational"] == true);
    assert!(!verdicts.is_empty());
    assert!(verdicts.iter().all(|t| !t["pass"].is_null()), "{targets:?}");
    assert_eq!(info.len(), 1, "{targets:?}");
    assert!(
        info[0]["measured"]
            .as_str()
            .is_some_and(|m| m.contains("a blocking round trip costs")
                && m.contains("x the official client's")),
        "{}",
        info[0]
    );
    let results_doc = doc["results"].as_array().expect("runs");
    assert_eq!(results_doc.len(), rows);
    assert!(
        results_doc
            .iter()
            .any(|r| r["client"] == "blocking" && r["created"] == OPS),
        "{results_doc:?}"
    );

    let summary = peers::summarize(&results, plan.default_conns);
    let table = peers::table(&summary, &plan.depths);
    let floor_label = Client::Blocking.label(plan.default_conns);
    assert_eq!(floor_label, "blocking round trip (floor)");
    let floor_rows: Vec<&str> = table
        .lines()
        .filter(|l| l.contains(&floor_label) && !l.starts_with("CPU/op"))
        .collect();
    assert_eq!(floor_rows.len(), 1, "{table}");
    assert!(floor_rows[0].trim_start().starts_with("1  "), "{table}");
    let (floor, ratio) = peers::floor_ratio(&summary).expect("floor and official at depth 1");
    assert!(floor > 0.0 && ratio > 0.0, "{floor} {ratio}");
    let text = peers::targets_text(&peers::targets(&summary, &plan.depths, plan.default_conns));
    assert!(text.contains("  info  depth 1 floor"), "{text}");
    let default_row = format!(
        "txgate 1 conn/node, gather {}us (default)",
        peers::default_gather_us()
    );
    for label in [
        default_row.as_str(),
        "txgate 2 conns/node, gather 0us",
        "official client",
    ] {
        assert!(
            table.matches(label).count() >= DEPTHS.len(),
            "{label}: {table}"
        );
    }
}

#[test]
fn percentiles_are_nearest_rank_and_medians_average_the_middle_pair() {
    let v: Vec<u64> = (1..=1000).collect();
    assert_eq!(peers::percentile(&v, 0.5), 500);
    assert_eq!(peers::percentile(&v, 0.99), 990);
    assert_eq!(peers::percentile(&v, 0.999), 999);
    assert_eq!(peers::percentile(&[7], 0.999), 7);
    assert_eq!(peers::percentile(&[], 0.5), 0);
    assert_eq!(peers::median([Some(3.0), None, Some(1.0)]), Some(2.0));
    assert_eq!(peers::median([Some(3.0), Some(1.0), Some(2.0)]), Some(2.0));
    assert_eq!(peers::median([None]), None);
}
