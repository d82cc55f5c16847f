//! drop-loop: the baseline receive-and-drop loop for the packets/s benchmark: `recvmmsg`
//! (blocking, a batch at a time) and nothing else. On SIGTERM/SIGINT, `--max-seconds` or
//! `--idle-ms` of silence it prints one JSON line (packets, CPU seconds) and exits 0.

use clap::Parser;
use udp_tools::{
    BaselineArgs, Error, JsonLine, RecvBatch, bind_receiver, cpu_seconds, loopback_addr,
    receive_loop, start_run,
};

const TOOL: &str = "drop-loop";
/// Receive slot size: larger datagrams are cut to this.
const SLOT_BYTES: usize = 2048;

#[derive(Parser)]
#[command(name = TOOL, version, about = "Baseline receive-and-drop loop: recvmmsg only")]
struct Args {
    #[command(flatten)]
    base: BaselineArgs,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        e.exit(TOOL);
    }
}

fn run(a: Args) -> Result<(), Error> {
    let listen = loopback_addr("--listen", &a.base.listen)?;
    start_run(a.base.batch, a.base.max_seconds, a.base.core)?;
    let sock = bind_receiver(listen, a.base.rcvbuf, false)?;
    let local = sock.local_addr().map_err(|e| Error::io("getsockname", e))?;
    eprintln!("{TOOL}: listening on {local}");

    let mut rx = RecvBatch::new(a.base.batch, SLOT_BYTES);
    let cpu0 = cpu_seconds();
    let end = receive_loop(
        &sock,
        &mut rx,
        a.base.max_seconds,
        a.base.idle_ms,
        |_, _| Ok(()),
    )?;
    let cpu1 = cpu_seconds();
    let line = JsonLine::default()
        .s("tool", TOOL)
        .s("listen", &local.to_string())
        .u("packets", end.received)
        .receiver(&end, &sock, a.base.batch, cpu0, cpu1)
        .finish();
    println!("{line}");
    Ok(())
}
