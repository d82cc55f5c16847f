"""Process and socket helpers shared by tools/exactly-once and tools/gate-bench.

Stdlib only. Every child is started through `Procs`, which pins it, makes the kernel kill
it if this script dies (PR_SET_PDEATHSIG), captures its stdout/stderr to files, and
stops it (SIGTERM, then SIGKILL after a bounded wait) on exit, Ctrl-C or an exception.
Every wait here has a timeout.
"""
import ctypes
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

PR_SET_PDEATHSIG = 1
STOP_WAIT_S = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

_libc = ctypes.CDLL(None, use_errno=True)


class HarnessError(Exception):
    """A step of the harness failed (not a usage error)."""


class UsageError(Exception):
    """A tool the harness started refused the flags it was given (exit 2)."""


# Environment twins of txgate's flags: a variable left in the caller's shell would change
# the subject under test without showing in its command line or the results.
SCRUBBED_ENV_PREFIXES = ("TXGATE_", "INGRESS_DEDUP_")


def child_env():
    """This process's environment without txgate's flag variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_ENV_PREFIXES)}


def check_cores(ap, flag, cores):
    """Exit 2 (via argparse) when a core list ("0", "0,2", "1-3", as txgate's --cores
    takes it) names a CPU this process may not use."""
    allowed = os.sched_getaffinity(0)
    for item in str(cores).replace(" ", "").split(","):
        if item == "":
            continue
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            ap.error(f"{flag} {cores}: {item!r} is not a core number or range")
        wanted = range(int(lo), int(hi or lo) + 1)
        if not wanted:
            ap.error(f"{flag} {cores}: the range {item} is empty")
        missing = [c for c in wanted if c not in allowed]
        if missing:
            ap.error(f"{flag} {cores}: core {missing[0]} is not one of this machine's usable "
                     f"CPUs {sorted(allowed)}")


def repo_root():
    """The txgate repository: two levels above tools/udp-tools."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port(kind=socket.SOCK_DGRAM):
    """A loopback port that was free a moment ago (bind :0, read, close)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate_on_signals():
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so `finally` blocks clean up."""

    def handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


class Child:
    def __init__(self, name, argv, popen, out_path, err_path):
        self.name = name
        self.argv = argv
        self.popen = popen
        self.out_path = out_path
        self.err_path = err_path

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def wait(self, timeout_s):
        """Exit code, or None if still running after timeout_s."""
        try:
            return self.popen.wait(timeout=max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig=signal.SIGTERM, timeout_s=STOP_WAIT_S):
        """Send sig, wait up to timeout_s, then SIGKILL. Returns the exit code."""
        if self.alive():
            try:
                self.popen.send_signal(sig)
            except ProcessLookupError:
                pass
            rc = self.wait(timeout_s)
            if rc is not None:
                return rc
            self.popen.kill()
            return self.wait(timeout_s)
        return self.popen.returncode

    def stdout(self):
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def stderr_tail(self, lines=15):
        with open(self.err_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def last_json(self, need_key=None):
        """The last stdout line that parses as a JSON object (with need_key, if given)."""
        for line in reversed(self.stdout().splitlines()):
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and (need_key is None or need_key in obj):
                return obj
        return None

    def cpu_s(self):
        """User + system CPU seconds of the whole process (all threads) from /proc."""
        return proc_cpu_s(self.pid)


class Procs:
    """Starts children and guarantees they are stopped when the `with` block ends."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.children = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_all()
        return False

    def start(self, name, argv, core=None):
        cores = None
        if core is not None:
            cores = {int(c) for c in str(core).split(",") if c != ""}
        out_path = os.path.join(self.log_dir, f"{name}.out")
        err_path = os.path.join(self.log_dir, f"{name}.err")

        def pre():
            os.setpgrp()
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if cores:
                os.sched_setaffinity(0, cores)

        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                p = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, preexec_fn=pre,
                    env=child_env(),
                )
            except (OSError, subprocess.SubprocessError) as e:
                where = f" pinned to core(s) {sorted(cores)}" if cores else ""
                raise HarnessError(f"cannot start {name} ({argv[0]}){where}: {e}") from e
        c = Child(name, argv, p, out_path, err_path)
        self.children.append(c)
        return c

    def stop_all(self):
        for c in reversed(self.children):
            if c.alive():
                c.stop(signal.SIGTERM, STOP_WAIT_S)


def proc_cpu_s(pid):
    """utime + stime of a process in seconds (/proc/PID/stat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def udp_sockets(port):
    """[(rx_queue_bytes, drops)] for every UDP socket bound to this local port."""
    out = []
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 13:
                continue
            if int(cols[1].rsplit(":", 1)[1], 16) != port:
                continue
            rx = int(cols[4].split(":")[1], 16)
            out.append((rx, int(cols[12])))
    return out


def udp_drops(port):
    """Datagrams dropped at full receive buffers, summed over the port's sockets."""
    return sum(d for _, d in udp_sockets(port))


def wait_udp_bound(port, child, timeout_s):
    """Wait until some socket is bound to port; fail if child exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if udp_sockets(port):
            return
        if child is not None and not child.alive():
            raise HarnessError(
                f"{child.name} exited ({child.popen.returncode}) before binding UDP port "
                f"{port}:\n{child.stderr_tail()}"
            )
        time.sleep(0.02)
    raise HarnessError(f"nothing bound UDP port {port} within {timeout_s} s")


def wait_udp_drained(port, timeout_s):
    """Wait until the port's receive queues are empty (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        socks = udp_sockets(port)
        if not socks or all(rx == 0 for rx, _ in socks):
            return True
        time.sleep(0.01)
    return False


def http_get(addr, path, timeout_s=2.0):
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=timeout_s) as r:
        return r.read().decode("utf-8", "replace")


def wait_http(addr, path, child, timeout_s):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise HarnessError(
                f"{child.name} exited ({child.popen.returncode}) before http://{addr}{path} "
                f"answered:\n{child.stderr_tail()}"
            )
        try:
            return http_get(addr, path, timeout_s=1.0)
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise HarnessError(f"http://{addr}{path} did not answer within {timeout_s} s ({last})")


def metrics_sums(text):
    """{metric name: value summed over all its label sets} from Prometheus text."""
    sums = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        try:
            name_labels, value = line.rsplit(None, 1)
            v = float(value)
        except ValueError:
            continue
        name = name_labels.split("{", 1)[0]
        sums[name] = sums.get(name, 0.0) + v
    return sums


def redis_cmd(port, *args, timeout_s=1.0):
    """One RESP command to 127.0.0.1:port; returns the first reply line (bounded)."""
    req = f"*{len(args)}\r\n".encode()
    for a in args:
        b = str(a).encode()
        req += b"$" + str(len(b)).encode() + b"\r\n" + b + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(req)
        data = b""
        while b"\r\n" not in data and len(data) < 4096:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0].decode("utf-8", "replace")


def wait_redis(port, child, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            raise HarnessError(f"redis-server exited early:\n{child.stderr_tail()}")
        try:
            if redis_cmd(port, "PING") == "+PONG":
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise HarnessError(f"redis-server on port {port} did not answer PING within {timeout_s} s")


def version_of(argv, timeout_s=5.0):
    """First line of `argv` output (e.g. `--version`), or 'unknown'."""
    try:
        r = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s, text=True
        )
        line = (r.stdout or r.stderr).strip().splitlines()
        return line[0] if line else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
