//! The peer benchmark (`benches/aerospike_peers.rs`) at toy scale, so CI
//! runs its measuring code: both clients at every depth against our test
//! server, every write created, none failed, and a report with every row.

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
    let mut runs_started = 0;
    let results = peers::run_all(&plan, || {
        runs_started += 1;
        Ok(())
    })
    .expect("every run completes");
    let rows = clients.len() * DEPTHS.len();
    assert_eq!(runs_started, rows);
    assert_eq!(results.len(), rows);

    // Every write of every run reached the server as a new record, warm-ups
    // included: keys are unique per run and create-only.
    assert_eq!(
        server.live_records() as u64,
        rows as u64 * (OPS + WARMUP_OPS)
    );
    assert_eq!(
        server.proxied(),
        0,
        "both clients route to partition masters"
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
            let row = summary
                .iter()
                .find(|r| r["client"] == client.id() && r["depth"] == depth)
                .unwrap_or_else(|| panic!("no row for {} at depth {depth}", client.id()));
            assert_eq!(row["ops"], OPS, "{row}");
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
    // Every target is computable from these rows (whatever it says at toy
    // scale on a shared machine).
    let targets = doc["targets"].as_array().expect("targets");
    assert!(!targets.is_empty());
    assert!(targets.iter().all(|t| !t["pass"].is_null()), "{targets:?}");

    let summary = peers::summarize(&results, plan.default_conns);
    let table = peers::table(&summary, &plan.depths);
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
