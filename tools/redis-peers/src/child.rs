//! Child processes pinned to one core, waited for with a bound, with their
//! exact CPU time from `wait4`.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How a child ended and what it cost.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// Exit code, or `None` when a signal ended it.
    pub code: Option<i32>,
    /// Killed by us for running past its limit.
    pub overran: bool,
    pub user_ns: u64,
    pub sys_ns: u64,
    /// From spawn to exit, as the parent saw it.
    pub wall: Duration,
}

impl Exit {
    pub fn ok(&self) -> bool {
        self.code == Some(0) && !self.overran
    }

    pub fn cpu_ns(&self) -> u64 {
        self.user_ns + self.sys_ns
    }

    pub fn describe(&self) -> String {
        match (self.overran, self.code) {
            (true, _) => format!("killed after {:.0} s (limit)", self.wall.as_secs_f64()),
            (false, Some(c)) => format!("exit code {c}"),
            (false, None) => "killed by a signal".to_owned(),
        }
    }
}

/// Makes `cmd`'s process run on `core` only and die with its parent (so a
/// Ctrl-C or crash of this tool never leaves a server or a peer behind).
/// Starts `cmd` with no signals blocked: this tool blocks SIGTERM, SIGINT and
/// SIGHUP in every thread (one thread takes them with `sigwait`), and a
/// child inherits the mask, so it would otherwise ignore a plain `kill`.
pub fn unblocked_signals(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls
    // sigemptyset and pthread_sigmask (async-signal-safe) on stack data.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            match libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) {
                0 => Ok(()),
                e => Err(std::io::Error::from_raw_os_error(e)),
            }
        });
    }
}

pub fn pin_and_tether(cmd: &mut Command, core: usize) {
    unblocked_signals(cmd);
    // SAFETY: the closure runs between fork and exec and only makes two
    // async-signal-safe system calls on plain stack data.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(core, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `cmd` pinned to `core` and waits at most `limit` for it (then kills
/// it); returns its exit and its own user + sys CPU time.
pub fn run_pinned(cmd: &mut Command, core: usize, limit: Duration) -> Result<Exit, String> {
    pin_and_tether(cmd, core);
    let started = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {:?}: {e}", cmd.get_program()))?;
    wait_bounded(child, started, limit)
}

/// Waits for `child` (at most `limit`, then SIGKILL) and reaps it with
/// `wait4`, which reports exactly that child's CPU time.
fn wait_bounded(child: Child, started: Instant, limit: Duration) -> Result<Exit, String> {
    let pid = child.id() as libc::pid_t;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let dog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
            // SAFETY: the child is not reaped before this thread is joined
            // (waitid below uses WNOWAIT), so `pid` still names it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            true
        } else {
            false
        }
    });
    // Wait for the exit without reaping, so the watchdog can never signal a
    // recycled pid.
    loop {
        // SAFETY: siginfo_t is plain data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("waiting for pid {pid}: {e}"));
        }
    }
    let wall = started.elapsed();
    drop(done_tx);
    let overran = dog.join().unwrap_or(false);
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it and reaps the zombie.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    if r != pid {
        return Err(format!(
            "reaping pid {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    drop(child); // already reaped; dropping a Child neither waits nor kills
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Ok(Exit {
        code,
        overran,
        user_ns: timeval_ns(ru.ru_utime),
        sys_ns: timeval_ns(ru.ru_stime),
        wall,
    })
}

pub fn timeval_ns(t: libc::timeval) -> u64 {
    t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000
}

/// This process's user and sys CPU time so far, in ns (all threads).
pub fn self_cpu_ns() -> (u64, u64) {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    (timeval_ns(ru.ru_utime), timeval_ns(ru.ru_stime))
}
