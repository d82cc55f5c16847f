//! The tools against each other over loopback: generator → sink (exactly-once counting),
//! generator → bare-forward → sink, generator → drop-loop, and refused addresses.

use std::net::UdpSocket;
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const GEN: &str = env!("CARGO_BIN_EXE_udp-gen");
const SINK: &str = env!("CARGO_BIN_EXE_udp-sink");
const FORWARD: &str = env!("CARGO_BIN_EXE_bare-forward");
const DROP: &str = env!("CARGO_BIN_EXE_drop-loop");
const EXIT_WAIT_S: u64 = 20;

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(bin: &str, args: &[&str]) -> Child {
    Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (bounded) until something is bound to the UDP port, per /proc/net/udp.
fn wait_bound(port: u16) {
    let hex = format!(":{port:04X} ");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if std::fs::read_to_string("/proc/net/udp")
            .unwrap()
            .contains(&hex)
        {
            return;
        }
        sleep(Duration::from_millis(10));
    }
    panic!("port {port} never bound");
}

fn finish(child: Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(EXIT_WAIT_S);
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "child did not exit");
        sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn term(child: &Child) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

/// The number after `"key":` in a one-line JSON summary.
fn field(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\":");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("{key} missing in {json}"))
        + pat.len();
    json[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn sink_counts_each_txid_once_and_reports_copies_as_duplicates() {
    let port = free_port();
    let to = format!("127.0.0.1:{port}");
    let sink = spawn(
        SINK,
        &["--listen", &to, "--txids", "5000", "--idle-ms", "500"],
    );
    wait_bound(port);
    let g = Command::new(GEN)
        .args([
            "--to", &to, "--txids", "5000", "--copies", "3", "--rate", "50000",
        ])
        .output()
        .unwrap();
    let g = stdout(&g);
    assert_eq!(field(&g, "sent"), 15_000);
    let s = stdout(&finish(sink));
    assert_eq!(field(&s, "received"), 15_000, "{s}");
    assert_eq!(field(&s, "unique"), 5_000, "{s}");
    assert_eq!(field(&s, "duplicates"), 10_000, "{s}");
    assert_eq!(field(&s, "lost"), 0, "{s}");
    assert_eq!(field(&s, "foreign"), 0, "{s}");
    assert_eq!(field(&s, "max_copies"), 3, "{s}");
}

#[test]
fn sink_reports_lost_txids_and_foreign_tags() {
    let port = free_port();
    let to = format!("127.0.0.1:{port}");
    let sink = spawn(
        SINK,
        &[
            "--listen",
            &to,
            "--txids",
            "2000",
            "--tag",
            "1",
            "--idle-ms",
            "500",
        ],
    );
    wait_bound(port);
    for (tag, txids) in [("1", "1500"), ("2", "100")] {
        let g = Command::new(GEN)
            .args([
                "--to", &to, "--txids", txids, "--tag", tag, "--rate", "50000",
            ])
            .output()
            .unwrap();
        stdout(&g);
    }
    let s = stdout(&finish(sink));
    assert_eq!(field(&s, "unique"), 1_500, "{s}");
    assert_eq!(field(&s, "lost"), 500, "{s}");
    assert_eq!(field(&s, "foreign"), 100, "{s}");
}

#[test]
fn bare_forward_passes_every_datagram_through_unchanged() {
    let (fport, sport) = (free_port(), free_port());
    let (faddr, saddr) = (format!("127.0.0.1:{fport}"), format!("127.0.0.1:{sport}"));
    let sink = spawn(
        SINK,
        &["--listen", &saddr, "--txids", "4000", "--idle-ms", "700"],
    );
    let fwd = spawn(
        FORWARD,
        &[
            "--listen",
            &faddr,
            "--forward",
            &saddr,
            "--rcvbuf",
            "4194304",
        ],
    );
    wait_bound(sport);
    wait_bound(fport);
    let g = Command::new(GEN)
        .args([
            "--to", &faddr, "--txids", "4000", "--copies", "2", "--rate", "40000",
        ])
        .output()
        .unwrap();
    stdout(&g);
    let s = stdout(&finish(sink));
    term(&fwd);
    let f = stdout(&finish(fwd));
    assert_eq!(field(&f, "packets"), 8_000, "{f}");
    assert_eq!(field(&f, "forwarded"), 8_000, "{f}");
    assert_eq!(field(&s, "unique"), 4_000, "{s}");
    assert_eq!(field(&s, "duplicates"), 4_000, "{s}");
    assert_eq!(field(&s, "foreign"), 0, "{s}");
}

#[test]
fn drop_loop_counts_and_stops_on_sigterm() {
    let port = free_port();
    let to = format!("127.0.0.1:{port}");
    let d = spawn(DROP, &["--listen", &to, "--rcvbuf", "4194304"]);
    wait_bound(port);
    let g = Command::new(GEN)
        .args(["--to", &to, "--txids", "3000", "--rate", "30000"])
        .output()
        .unwrap();
    stdout(&g);
    sleep(Duration::from_millis(200));
    term(&d);
    let out = stdout(&finish(d));
    assert_eq!(field(&out, "packets"), 3_000, "{out}");
}

#[test]
fn non_loopback_addresses_and_bad_flags_exit_2() {
    for (bin, args) in [
        (GEN, vec!["--to", "10.1.2.3:9"]),
        (GEN, vec!["--to", "127.0.0.1:9,8.8.8.8:53"]),
        (GEN, vec!["--to", "127.0.0.1:9", "--txid-len", "8"]),
        (GEN, vec!["--to", "127.0.0.1:9", "--bogus"]),
        (SINK, vec!["--listen", "0.0.0.0:9"]),
        (
            FORWARD,
            vec!["--listen", "127.0.0.1:0", "--forward", "192.168.0.1:9"],
        ),
        (DROP, vec!["--listen", "[::]:9"]),
    ] {
        let o = Command::new(bin).args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{bin} {args:?}: {o:?}");
    }
}
