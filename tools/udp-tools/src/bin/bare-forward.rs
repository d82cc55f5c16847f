//! bare-forward: the baseline forwarder for the packets/s benchmark. `recvmmsg`
//! (blocking, a batch at a time) → `sendmmsg` of the same payloads, unchanged, to one
//! loopback address; no dedup, no parsing. On SIGTERM/SIGINT, `--max-seconds` or
//! `--idle-ms` of silence it prints one JSON line (packets, CPU seconds) and exits 0.

use std::mem;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use clap::Parser;
use udp_tools::{
    BaselineArgs, Error, JsonLine, RecvBatch, bind_receiver, cpu_seconds, loopback_addr,
    receive_loop, send_all, start_run,
};

const TOOL: &str = "bare-forward";
/// Receive slot size: larger datagrams are forwarded cut to this.
const SLOT_BYTES: usize = 2048;

#[derive(Parser)]
#[command(name = TOOL, version, about = "Baseline forwarder: recvmmsg -> sendmmsg, no dedup")]
struct Args {
    #[command(flatten)]
    base: BaselineArgs,
    /// Address to forward every datagram to (loopback only).
    #[arg(long)]
    forward: String,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        e.exit(TOOL);
    }
}

fn run(a: Args) -> Result<(), Error> {
    let listen = loopback_addr("--listen", &a.base.listen)?;
    let forward = loopback_addr("--forward", &a.forward)?;
    start_run(a.base.batch, a.base.max_seconds, a.base.core)?;
    let sock = bind_receiver(listen, a.base.rcvbuf, false)?;
    let local = sock.local_addr().map_err(|e| Error::io("getsockname", e))?;
    let out_bind: SocketAddr = if forward.is_ipv4() {
        "127.0.0.1:0".parse().expect("literal")
    } else {
        "[::1]:0".parse().expect("literal")
    };
    let out = UdpSocket::bind(out_bind).map_err(|e| Error::io(format!("bind {out_bind}"), e))?;
    out.connect(forward)
        .map_err(|e| Error::io(format!("connect {forward}"), e))?;
    eprintln!("{TOOL}: listening on {local}, forwarding to {forward}");

    let mut rx = RecvBatch::new(a.base.batch, SLOT_BYTES);
    let mut iovs: Vec<libc::iovec> = (0..a.base.batch).map(|i| rx.iov(i)).collect();
    let mut hdrs: Vec<libc::mmsghdr> = (0..a.base.batch)
        // SAFETY: mmsghdr is plain data; all-zero is a valid header with no name.
        .map(|_| unsafe { mem::zeroed() })
        .collect();
    let fd = out.as_raw_fd();
    let mut forwarded: u64 = 0;
    let mut send_errors: u64 = 0;
    let mut truncated: u64 = 0;
    let cpu0 = cpu_seconds();
    let end = receive_loop(
        &sock,
        &mut rx,
        a.base.max_seconds,
        a.base.idle_ms,
        |rx, n| {
            for i in 0..n {
                iovs[i] = rx.iov(i);
                // SAFETY: i < iovs.len(); iovs outlives the send below.
                hdrs[i].msg_hdr.msg_iov = unsafe { iovs.as_mut_ptr().add(i) };
                hdrs[i].msg_hdr.msg_iovlen = 1;
                truncated += u64::from(rx.truncated(i));
            }
            let o = send_all(fd, &mut hdrs[..n])?;
            forwarded += o.sent as u64;
            send_errors += o.errors as u64;
            Ok(())
        },
    )?;
    let cpu1 = cpu_seconds();
    let line = JsonLine::default()
        .s("tool", TOOL)
        .s("listen", &local.to_string())
        .s("forward", &forward.to_string())
        .u("packets", end.received)
        .u("forwarded", forwarded)
        .u("send_errors", send_errors)
        .u("truncated", truncated)
        .receiver(&end, &sock, a.base.batch, cpu0, cpu1)
        .finish();
    println!("{line}");
    Ok(())
}
