//! udp-sink: a loopback-only `recvmmsg` counting sink.
//!
//! Counts datagrams; with `--txids N` it decodes each test TxID (see `udp-gen`) and
//! reports how many distinct TxIDs arrived (`unique`), copies beyond the first
//! (`duplicates`), TxIDs never seen (`lost`) and datagrams that are not of this run
//! (`foreign`: too short, another run tag, index out of range). Stops after `--idle-ms`
//! of silence once something arrived, at `--max-seconds`, or on SIGTERM/SIGINT, and
//! prints one JSON line on stdout.

use clap::Parser;
use udp_tools::{
    Error, JsonLine, RecvBatch, bind_receiver, check_txid_layout, cpu_seconds, loopback_addr,
    parse_tag, rcvbuf_bytes, receive_loop, socket_drops, split_txid, start_run, tag_bytes,
};

const TOOL: &str = "udp-sink";
/// Largest --txids (one byte of count per TxID).
const TXIDS_MAX: u64 = 1 << 28;
/// Receive slot size: larger datagrams are counted and flagged truncated.
const SLOT_BYTES: usize = 2048;

#[derive(Parser)]
#[command(name = TOOL, version, about = "Loopback-only recvmmsg sink that checks exactly-once")]
struct Args {
    /// Address to bind (loopback only).
    #[arg(long)]
    listen: String,
    /// TxIDs the generator sends; enables the exactly-once count.
    #[arg(long)]
    txids: Option<u64>,
    /// Where the TxID starts in the payload.
    #[arg(long, default_value_t = 0)]
    txid_offset: usize,
    /// TxID bytes (as given to udp-gen).
    #[arg(long, default_value_t = 16)]
    txid_len: usize,
    /// The run tag (hex) to accept; default: the tag of the first datagram.
    #[arg(long)]
    tag: Option<String>,
    /// Stop after this much silence once something arrived (0 = never).
    #[arg(long, default_value_t = 2000)]
    idle_ms: u64,
    /// Stop after this long in any case.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
    /// Pin to this CPU.
    #[arg(long)]
    core: Option<usize>,
    /// Datagrams per recvmmsg.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// SO_RCVBUF bytes, forced past net.core.rmem_max when root (0 = kernel default).
    #[arg(long, default_value_t = 8 << 20)]
    rcvbuf: usize,
}

/// Exactly-once bookkeeping over indices 0..txids.
struct Tally {
    offset: usize,
    len: usize,
    tag: Option<Vec<u8>>,
    counts: Vec<u8>,
    decoded: u64,
    foreign: u64,
}

impl Tally {
    fn new(txids: u64, offset: usize, len: usize, tag: Option<Vec<u8>>) -> Self {
        Tally {
            offset,
            len,
            tag,
            counts: vec![0; txids as usize],
            decoded: 0,
            foreign: 0,
        }
    }

    #[inline]
    fn add(&mut self, payload: &[u8]) {
        let Some(txid) = payload.get(self.offset..self.offset + self.len) else {
            self.foreign += 1;
            return;
        };
        let (tag, index) = split_txid(txid);
        let tag_ok = match &self.tag {
            Some(t) => t.as_slice() == tag,
            None => {
                if index < self.counts.len() as u64 {
                    self.tag = Some(tag.to_vec());
                }
                true
            }
        };
        if !tag_ok || index >= self.counts.len() as u64 {
            self.foreign += 1;
            return;
        }
        let c = &mut self.counts[index as usize];
        *c = c.saturating_add(1);
        self.decoded += 1;
    }

    /// (unique, duplicates, lost, most copies of one TxID (saturates at 255)).
    fn result(&self) -> (u64, u64, u64, u64) {
        let unique = self.counts.iter().filter(|&&c| c > 0).count() as u64;
        let max = self.counts.iter().copied().max().unwrap_or(0);
        (
            unique,
            self.decoded - unique,
            self.counts.len() as u64 - unique,
            u64::from(max),
        )
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        e.exit(TOOL);
    }
}

fn run(a: Args) -> Result<(), Error> {
    let listen = loopback_addr("--listen", &a.listen)?;
    let mut tally = match a.txids {
        Some(n) if (1..=TXIDS_MAX).contains(&n) => {
            check_txid_layout(a.txid_offset, a.txid_len, None)?;
            let tag = match &a.tag {
                Some(t) => Some(tag_bytes(parse_tag(t)?, a.txid_len)),
                None => None,
            };
            Some(Tally::new(n, a.txid_offset, a.txid_len, tag))
        }
        Some(n) => {
            return Err(Error::Usage(format!(
                "--txids {n}: must be 1..={TXIDS_MAX}"
            )));
        }
        None => None,
    };
    start_run(a.batch, a.max_seconds, a.core)?;
    let sock = bind_receiver(listen, a.rcvbuf, true)?;
    let local = sock.local_addr().map_err(|e| Error::io("getsockname", e))?;
    eprintln!("{TOOL}: listening on {local}");

    let mut rx = RecvBatch::new(a.batch, SLOT_BYTES);
    let cpu0 = cpu_seconds();
    let mut bytes: u64 = 0;
    let mut truncated: u64 = 0;
    let end = receive_loop(&sock, &mut rx, a.max_seconds, a.idle_ms, |rx, n| {
        for i in 0..n {
            let p = rx.packet(i);
            bytes += p.len() as u64;
            truncated += u64::from(rx.truncated(i));
            if let Some(t) = tally.as_mut() {
                t.add(p);
            }
        }
        Ok(())
    })?;
    let cpu1 = cpu_seconds();
    let active_s = end.active_s();
    let received = end.received;
    let stopped = end.stopped;
    let mut line = JsonLine::default()
        .s("tool", TOOL)
        .s("listen", &local.to_string())
        .u("received", received)
        .u("bytes", bytes)
        .u("truncated", truncated)
        .f("seconds", active_s)
        .f(
            "pps",
            if active_s > 0.0 {
                received as f64 / active_s
            } else {
                0.0
            },
        )
        .s("stopped", stopped)
        .opt_u("rcvbuf_drops", socket_drops(&sock))
        .u("rcvbuf_bytes", rcvbuf_bytes(&sock) as u64)
        .f("cpu_user_s", cpu1.0 - cpu0.0)
        .f("cpu_sys_s", cpu1.1 - cpu0.1);
    if let Some(t) = &tally {
        let (unique, duplicates, lost, max_copies) = t.result();
        line = line
            .u("txids", t.counts.len() as u64)
            .u("unique", unique)
            .u("duplicates", duplicates)
            .u("lost", lost)
            .u("foreign", t.foreign)
            .u("max_copies", max_copies);
    }
    println!("{}", line.finish());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Tally;
    use udp_tools::{tag_bytes, write_index};

    fn packet(tag: u64, index: u64) -> Vec<u8> {
        let mut p = vec![0xee; 64];
        p[..8].copy_from_slice(&tag_bytes(tag, 16));
        write_index(&mut p[..16], index);
        p
    }

    #[test]
    fn counts_unique_duplicates_lost_and_foreign() {
        let mut t = Tally::new(5, 0, 16, None);
        for i in [0, 1, 1, 3, 3, 3] {
            t.add(&packet(7, i));
        }
        t.add(&packet(8, 2)); // another run's tag
        t.add(&packet(7, 9)); // out of range
        t.add(&[1, 2, 3]); // too short
        assert_eq!(t.result(), (3, 3, 2, 3));
        assert_eq!(t.foreign, 3);
    }
}
