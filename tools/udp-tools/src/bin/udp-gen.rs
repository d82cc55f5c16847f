//! udp-gen: a loopback-only `sendmmsg` load generator of test TxIDs.
//!
//! Sends K copies of each of N TxIDs. A TxID is the run tag (`txid_len - 8` bytes) then
//! the TxID's index as a big-endian u64, so `udp-sink` can check exactly-once. Copies are
//! interleaved like redundant feeds: TxIDs go out in windows of `--spread` TxIDs, copy 0
//! of the whole window, then copy 1, …, so two copies of one TxID are `--spread` packets
//! apart. Copy c of TxID i goes to target `(i + c) % targets`, so with K >= targets every
//! target sees a copy of every TxID. Prints one JSON line on stdout.

use std::mem;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use udp_tools::{
    DATAGRAM_BYTES_MAX, Error, JsonLine, check_txid_layout, cpu_seconds, loopback_addrs, parse_tag,
    send_all, splitmix64, start_run, stop_requested, tag_bytes, to_sockaddr, write_index,
};

const TOOL: &str = "udp-gen";
/// Largest --copies (and 1/(1-ratio)).
const COPIES_MAX: u64 = 1000;
/// Largest --txids.
const TXIDS_MAX: u64 = 1 << 40;

#[derive(Parser)]
#[command(name = TOOL, version, about = "Loopback-only sendmmsg load generator of test TxIDs")]
struct Args {
    /// Targets, ADDR[,ADDR…] (loopback only); copies of a TxID are spread over them.
    #[arg(long)]
    to: String,
    /// Distinct TxIDs to send.
    #[arg(long, default_value_t = 1_000_000)]
    txids: u64,
    /// Copies of each TxID (1 = all novel; 10 = 90 % duplicates).
    #[arg(long, conflicts_with = "duplicate_ratio")]
    copies: Option<u64>,
    /// Share of duplicates, 0 <= F < 1; sets copies = round(1 / (1 - F)).
    #[arg(long)]
    duplicate_ratio: Option<f64>,
    /// Datagram payload bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Where the TxID starts in the payload.
    #[arg(long, default_value_t = 0)]
    txid_offset: usize,
    /// TxID bytes (at least 12: run tag, then an 8-byte index).
    #[arg(long, default_value_t = 16)]
    txid_len: usize,
    /// TxIDs per interleaving window: copies of one TxID go out this many packets apart.
    #[arg(long, default_value_t = 64)]
    spread: u64,
    /// Packets per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seed of the filler bytes and (with the clock) of the run tag.
    #[arg(long)]
    seed: Option<u64>,
    /// Run tag as hex (default: from seed and clock, new every run).
    #[arg(long)]
    tag: Option<String>,
    /// Pin to this CPU.
    #[arg(long)]
    core: Option<usize>,
    /// Datagrams per sendmmsg.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Stop sending after this long even if not done.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
}

struct Plan {
    txids: u64,
    copies: u64,
    spread: u64,
}

impl Plan {
    fn packets(&self) -> u64 {
        self.txids * self.copies
    }

    /// (TxID index, copy number) of packet `p`.
    #[inline]
    fn at(&self, p: u64) -> (u64, u64) {
        let block_packets = self.spread * self.copies;
        let block = p / block_packets;
        let first = block * self.spread;
        let width = self.spread.min(self.txids - first);
        let o = p - block * block_packets;
        (first + o % width, o / width)
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        e.exit(TOOL);
    }
}

fn run(a: Args) -> Result<(), Error> {
    let targets = loopback_addrs("--to", &a.to)?;
    let copies = match (a.copies, a.duplicate_ratio) {
        (Some(c), _) => c,
        (None, Some(f)) if (0.0..1.0).contains(&f) => (1.0 / (1.0 - f)).round() as u64,
        (None, Some(f)) => {
            return Err(Error::Usage(format!(
                "--duplicate-ratio {f}: must be 0 <= F < 1"
            )));
        }
        (None, None) => 1,
    };
    if !(1..=COPIES_MAX).contains(&copies) {
        return Err(Error::Usage(format!(
            "copies {copies}: must be 1..={COPIES_MAX}"
        )));
    }
    if !(1..=TXIDS_MAX).contains(&a.txids) {
        return Err(Error::Usage(format!(
            "--txids {}: must be 1..={TXIDS_MAX}",
            a.txids
        )));
    }
    if !(1..=DATAGRAM_BYTES_MAX).contains(&a.size) {
        return Err(Error::Usage(format!(
            "--size {}: must be 1..={DATAGRAM_BYTES_MAX}",
            a.size
        )));
    }
    check_txid_layout(a.txid_offset, a.txid_len, Some(a.size))?;
    if !(1..=1 << 20).contains(&a.spread) {
        return Err(Error::Usage(format!(
            "--spread {}: must be 1..=1048576",
            a.spread
        )));
    }
    start_run(a.batch, a.max_seconds, a.core)?;

    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let seed = a.seed.unwrap_or(now_ns);
    let tag = match &a.tag {
        Some(t) => parse_tag(t)?,
        None => {
            let mut s = seed ^ now_ns.rotate_left(17) ^ u64::from(std::process::id());
            splitmix64(&mut s)
        }
    };

    // One template datagram: filler from the seed, the run tag in place; per packet only
    // the 8 index bytes change.
    let mut template = vec![0u8; a.size];
    let mut s = seed;
    for chunk in template.chunks_mut(8) {
        let w = splitmix64(&mut s).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
    let tag_len = a.txid_len - udp_tools::TXID_INDEX_BYTES;
    template[a.txid_offset..a.txid_offset + tag_len].copy_from_slice(&tag_bytes(tag, a.txid_len));

    let bind: SocketAddr = if targets[0].is_ipv4() {
        "127.0.0.1:0".parse().expect("literal")
    } else {
        "[::1]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(bind).map_err(|e| Error::io(format!("bind {bind}"), e))?;
    if targets.iter().any(|t| t.is_ipv4() != bind.is_ipv4()) {
        return Err(Error::Usage(
            "--to: mixing IPv4 and IPv6 targets is not supported".into(),
        ));
    }
    let mut names: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
        targets.iter().map(to_sockaddr).collect();

    let batch = a.batch;
    let mut bufs = template.repeat(batch);
    let mut iovs: Vec<libc::iovec> = (0..batch)
        .map(|i| libc::iovec {
            // SAFETY: i * size < bufs.len().
            iov_base: unsafe { bufs.as_mut_ptr().add(i * a.size) }.cast(),
            iov_len: a.size,
        })
        .collect();
    let mut hdrs: Vec<libc::mmsghdr> = (0..batch)
        .map(|i| {
            // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
            let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
            // SAFETY: i < iovs.len().
            h.msg_hdr.msg_iov = unsafe { iovs.as_mut_ptr().add(i) };
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();

    let plan = Plan {
        txids: a.txids,
        copies,
        spread: a.spread,
    };
    let total = plan.packets();
    let n_targets = targets.len() as u64;
    let fd = sock.as_raw_fd();
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.max_seconds);
    let mut sent: u64 = 0;
    let mut attempted: u64 = 0;
    let mut errors: u64 = 0;
    let mut stopped = "done";
    while attempted < total {
        if stop_requested() {
            stopped = "signal";
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            stopped = "max-seconds";
            break;
        }
        if a.rate > 0 {
            let due = start + Duration::from_secs_f64(attempted as f64 / a.rate as f64);
            if due > now {
                std::thread::sleep((due - now).min(deadline - now));
                continue;
            }
        }
        let n = ((total - attempted) as usize).min(batch);
        for (j, hdr) in hdrs.iter_mut().enumerate().take(n) {
            let (i, c) = plan.at(attempted + j as u64);
            let at = j * a.size + a.txid_offset;
            write_index(&mut bufs[at..at + a.txid_len], i);
            let (name, len) = &mut names[((i + c) % n_targets) as usize];
            hdr.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
            hdr.msg_hdr.msg_namelen = *len;
        }
        let out = send_all(fd, &mut hdrs[..n])?;
        sent += out.sent as u64;
        errors += out.errors as u64;
        attempted += n as u64;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds();
    let line = JsonLine::default()
        .s("tool", TOOL)
        .u("sent", sent)
        .u("planned", total)
        .b("complete", attempted == total)
        .s("stopped", stopped)
        .u("send_errors", errors)
        .u("txids", plan.txids)
        .u("copies", copies)
        .u("targets", n_targets)
        .u("spread", plan.spread)
        .u("size", a.size as u64)
        .u("rate", a.rate)
        .u("batch", batch as u64)
        .s("tag", &format!("{tag:016x}"))
        .f("seconds", seconds)
        .f("pps", sent as f64 / seconds.max(1e-9))
        .f("cpu_user_s", cpu1.0 - cpu0.0)
        .f("cpu_sys_s", cpu1.1 - cpu0.1)
        .finish();
    println!("{line}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Plan;

    #[test]
    fn every_copy_of_every_txid_is_planned_once_and_copies_are_spread() {
        for (txids, copies, spread) in [(10, 3, 4), (7, 1, 64), (100, 10, 64), (5, 2, 1)] {
            let plan = Plan {
                txids,
                copies,
                spread,
            };
            let mut seen = vec![vec![]; txids as usize];
            for p in 0..plan.packets() {
                let (i, c) = plan.at(p);
                seen[i as usize].push((c, p));
            }
            for (i, s) in seen.iter().enumerate() {
                let cs: Vec<u64> = s.iter().map(|x| x.0).collect();
                assert_eq!(cs, (0..copies).collect::<Vec<_>>(), "txid {i}");
                for w in s.windows(2) {
                    let width = spread.min(txids - (i as u64 / spread) * spread);
                    assert_eq!(w[1].1 - w[0].1, width);
                }
            }
        }
    }
}
