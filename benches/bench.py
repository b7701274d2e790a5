#!/usr/bin/env python3
"""Loopback benchmark: a direct connection vs staybound vs HAProxy (1 and 2 threads) vs a plain tokio proxy.

One command runs every contender, interleaved in a rotated order over several rounds, and writes a
markdown table (stdout and OUT/latest.md), the raw numbers (OUT/latest.json) and a plot of the ratios
to direct (OUT/latest.svg). See benches/README.md for what each row means.

The counted rows (instructions per request under callgrind, syscalls per request under strace) run
after the rounds: they count work, not time, so they need no quiet machine.

Python 3.11, standard library only. Needs iperf3, redis-server and redis-benchmark; haproxy, valgrind
and strace are optional. Every process it starts is tracked by PID and stopped at the end; every wait
is bounded in time.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import os
import platform
import random
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# Ports are fixed; every test gets fresh 127.77.x.y addresses instead (see Addrs).
LISTEN_PORT = 16000
UPSTREAM_PORT = 17000
ADMIN_PORT = 18000

# HAProxy needs about 2 fds per connection plus a few; with the 20 000 open-file limit here,
# `maxconn 20000` makes it refuse to start ("Cannot raise FD limit"), so it gets the largest round
# number that fits, which still covers the 8 000 held connections of the RSS row.
HAPROXY_MAXCONN = 9900

# Counted rows: a proxy under valgrind starts in seconds rather than milliseconds and writes its
# profile on exit; generous bounds, so a stuck run costs minutes, not the whole benchmark.
COUNTED_START_S = 120.0
COUNTED_RUN_S = 300.0
COUNTED_STOP_S = 60.0


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class Sizes:
    iperf_seconds: int
    iperf_omit: int
    redis_n: int  # 50 clients, no pipelining
    pipeline_n: int  # 50 clients, 16-deep pipeline
    churn_n: int  # 50 clients, a new connection per request
    lat1_n: int  # 1 client, no pipelining
    rss_conns: int
    # Counted rows: the two request counts of each workload; the difference of the two runs' counts,
    # divided by the difference of the sizes, is the count per request with start-up and shutdown
    # cancelled. Start-up work that depends on time does not cancel exactly: quanta (under staybound's
    # metrics exporter) calibrates its clock by spinning on clock_gettime for up to 200 ms, 3 to 12
    # million instructions under valgrind depending on how fast the process runs. The full sizes make
    # that at most about 1 % of a request's count (see the per-function profile for an exact view).
    counted_n: dict[str, tuple[int, int]] = field(default_factory=dict)

    @staticmethod
    def full() -> "Sizes":
        return Sizes(iperf_seconds=5, iperf_omit=1, redis_n=150_000, pipeline_n=2_000_000,
                     churn_n=20_000, lat1_n=50_000, rss_conns=8000,
                     counted_n={"redis": (20_000, 120_000), "pipeline": (200_000, 1_200_000),
                                "churn": (4_000, 20_000)})

    @staticmethod
    def quick() -> "Sizes":
        return Sizes(iperf_seconds=1, iperf_omit=0, redis_n=15_000, pipeline_n=200_000,
                     churn_n=2_000, lat1_n=5_000, rss_conns=1000,
                     counted_n={"redis": (5_000, 25_000), "pipeline": (50_000, 250_000),
                                "churn": (1_000, 5_000)})


# Tests are what runs; rows are what the table shows. A test can feed several rows.
TESTS = ["iperf1", "iperf4", "redis", "pipeline", "churn", "lat1", "rss"]
# Counted tests run outside the timed rounds, once per --count-runs, each over the three workloads.
COUNTED_TESTS = ["instr", "syscalls"]
# The workloads of the counted rows: (clients, pipeline depth, keep-alive) for redis-benchmark GET.
COUNTED_WORKLOADS = {"redis": (50, 1, 1), "pipeline": (50, 16, 1), "churn": (50, 1, 0)}


@dataclass
class Row:
    key: str
    title: str
    unit: str
    test: str
    metric: str
    # "ratio" (higher is better), "added" (latency: proxy minus direct), "absolute" (proxy only),
    # "counted" (proxy only, counted outside the timed rounds)
    kind: str
    fmt: str = "{:.1f}"
    short: str = ""  # label in the plot


ROWS = [
    Row("iperf1", "iperf3, 1 stream", "Gbit/s", "iperf1", "gbps", "ratio", "{:.2f}"),
    Row("iperf4", "iperf3, 4 streams", "Gbit/s", "iperf4", "gbps", "ratio", "{:.2f}"),
    Row("redis", "redis GET, 50 clients, no pipelining", "req/s", "redis", "rps", "ratio", "{:,.0f}"),
    Row("pipeline", "redis GET, 50 clients, 16-deep pipeline", "req/s", "pipeline", "rps", "ratio",
        "{:,.0f}"),
    Row("churn", "redis GET, new connection per request (-k 0)", "req/s", "churn", "rps", "ratio",
        "{:,.0f}"),
    Row("lat_p50", "added p50 latency, 50 clients, no pipelining", "ms", "redis", "p50", "added",
        "{:.3f}"),
    Row("lat_p99", "added p99 latency, 50 clients, no pipelining", "ms", "redis", "p99", "added",
        "{:.3f}"),
    Row("lat1_p50", "added p50 latency, 1 client (unloaded)", "ms", "lat1", "p50", "added", "{:.3f}"),
    Row("lat1_p99", "added p99 latency, 1 client (unloaded)", "ms", "lat1", "p99", "added", "{:.3f}"),
    Row("rss", "RSS per idle proxied connection", "KiB", "rss", "kib_per_conn", "absolute", "{:.2f}"),
    Row("cpu", "proxy CPU seconds per 100 000 requests (50 clients)", "s", "redis", "cpu_per_100k",
        "absolute", "{:.3f}"),
    Row("cpu_churn", "proxy CPU seconds per 100 000 requests (new connection each)", "s", "churn",
        "cpu_per_100k", "absolute", "{:.3f}"),
    # The whole machine's busy time (every process, interrupts and softirqs) over the requests: what a path
    # costs that the proxy's own CPU time does not show (NAT, conntrack, a BPF hook), next to direct's.
    Row("mcpu", "added machine CPU seconds per 100 000 requests (50 clients)", "s", "redis", "machine_per_100k",
        "added", "{:.3f}"),
    Row("mcpu_churn", "added machine CPU seconds per 100 000 requests (new connection each)", "s", "churn",
        "machine_per_100k", "added", "{:.3f}"),
    Row("instr_redis", "instructions per request, redis GET, 50 clients", "instructions", "instr",
        "redis", "counted", "{:,.0f}"),
    Row("instr_pipeline", "instructions per request, redis GET, 50 clients, 16-deep pipeline",
        "instructions", "instr", "pipeline", "counted", "{:,.0f}"),
    Row("instr_churn", "instructions per request, redis GET, new connection per request",
        "instructions", "instr", "churn", "counted", "{:,.0f}"),
    Row("sys_redis", "syscalls per request, redis GET, 50 clients", "syscalls", "syscalls", "redis",
        "counted", "{:.2f}"),
    Row("sys_pipeline", "syscalls per request, redis GET, 50 clients, 16-deep pipeline", "syscalls",
        "syscalls", "pipeline", "counted", "{:.3f}"),
    Row("sys_churn", "syscalls per request, redis GET, new connection per request", "syscalls",
        "syscalls", "churn", "counted", "{:.2f}"),
]
SHORT = {
    "iperf1": "iperf3, 1 stream", "iperf4": "iperf3, 4 streams", "redis": "redis, 50 clients",
    "pipeline": "redis, 50 clients, -P 16", "churn": "redis, new connection per request",
    "lat_p50": "p50, 50 clients", "lat_p99": "p99, 50 clients", "lat1_p50": "p50, 1 client",
    "lat1_p99": "p99, 1 client", "rss": "RSS per idle connection [KiB]",
    "cpu": "CPU s per 100k requests", "cpu_churn": "CPU s per 100k new connections",
    "mcpu": "machine CPU s per 100k requests", "mcpu_churn": "machine CPU s per 100k new connections",
    "instr_redis": "50 clients", "instr_pipeline": "50 clients, -P 16",
    "instr_churn": "new connection per request", "sys_redis": "50 clients",
    "sys_pipeline": "50 clients, -P 16", "sys_churn": "new connection per request",
}
for _r in ROWS:
    _r.short = SHORT[_r.key]
ROW_BY_KEY = {r.key: r for r in ROWS}
# --only accepts row keys, test names and these groups.
ONLY_ALIASES = {
    "latency": ["lat_p50", "lat_p99"],
    "latency1": ["lat1_p50", "lat1_p99"],
    "lat1": ["lat1_p50", "lat1_p99"],
    "counted": ["instr_redis", "instr_pipeline", "instr_churn", "sys_redis", "sys_pipeline",
                "sys_churn"],
}


@dataclass
class Contender:
    name: str  # column label
    kind: str  # "direct", "haproxy", "staybound", "transparent", "plain"
    threads: int = 0
    intercept: str = ""  # transparent: "nat" (an nftables rule) or "connect" (the connect hook)
    cmd: list[str] = field(default_factory=list)  # staybound, transparent, plain: argv template
    standin: bool = False


# ---------------------------------------------------------------------------------------------
# Process bookkeeping: only what we start, by PID


class Procs:
    def __init__(self) -> None:
        self.live: dict[int, subprocess.Popen] = {}

    def spawn(self, argv: list[str], log: Path, **kw) -> subprocess.Popen:
        with open(log, "ab") as f:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True, **kw)
        self.live[p.pid] = p
        return p

    def stop(self, p: subprocess.Popen | None, grace: float = 5.0) -> None:
        if p is None:
            return
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        self.live.pop(p.pid, None)

    def stop_traced(self, p: subprocess.Popen | None, grace: float) -> bool:
        """Stop a proxy that runs under strace: SIGTERM goes to the traced processes (strace's
        children, which we started through it), so that they end as they would alone and strace
        writes its summary when the last one is gone. Signalling strace itself would detach it and
        leave the proxy running. Returns whether strace exited within `grace` seconds."""
        if p is None:
            return True
        kids = children(p.pid)
        for pid in kids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=grace)
            clean = True
        except subprocess.TimeoutExpired:
            clean = False
        for pid in kids:  # still there only if strace was stuck: not orphaned, ours
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stop(p, grace=2.0)
        return clean

    def stop_all(self) -> None:
        for p in list(self.live.values()):
            self.stop(p, grace=2.0)


def children(pid: int) -> list[int]:
    """The direct children of `pid` (every thread's), from /proc."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
    except OSError:
        pass
    return out


PROCS = Procs()


def run_bounded(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a client to completion; on timeout kill it (our child only) and raise."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True, text=True)
    PROCS.live[p.pid] = p
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate(timeout=5)
        raise BenchError(f"{argv[0]} did not finish within {timeout:.0f}s")
    finally:
        PROCS.live.pop(p.pid, None)
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Addresses and readiness


class Addrs:
    """Hands out a fresh 127.77.x.y for every listener, so connection churn never meets TIME_WAIT
    left by an earlier run (of this or of a previous invocation: the start is random)."""

    def __init__(self) -> None:
        self.i = random.randrange(0, 200) * 250

    def next(self) -> str:
        self.i = (self.i + 1) % (256 * 250)
        return f"127.77.{self.i // 250}.{self.i % 250 + 1}"


def _proc_net_hex(host: str, port: int) -> str:
    return socket.inet_aton(host)[::-1].hex().upper() + ":" + f"{port:04X}"


def is_listening(host: str, port: int) -> bool:
    want = _proc_net_hex(host, port)
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] == want and parts[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def wait_listening(host: str, port: int, proc: subprocess.Popen, what: str, log: Path,
                   timeout: float = 10.0) -> None:
    """Wait for a listening socket without connecting to it (a probe connection would count as
    iperf3's one test, and through a proxy it would reach the upstream)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} before listening on "
                             f"{host}:{port}: {tail(log)}")
        if is_listening(host, port):
            return
        time.sleep(0.02)
    raise BenchError(f"{what} not listening on {host}:{port} after {timeout:.0f}s: {tail(log)}")


def wait_intercepting(upstream: str, proc: subprocess.Popen, what: str, log: Path,
                      timeout: float = 10.0) -> None:
    """Wait until staybound's nftables rule for `upstream` is in place: it installs it after binding its
    listener, and a client that dials the upstream before then goes straight to it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} before intercepting: {tail(log)}")
        out = run_bounded(["nft", "list", "table", "inet", "staybound"], 5.0)
        if out.returncode == 0 and f"{upstream} " in out.stdout:
            return
        time.sleep(0.02)
    raise BenchError(f"{what}: no interception rule for {upstream} after {timeout:.0f}s: {tail(log)}")


def wait_hooked(proc: subprocess.Popen, what: str, log: Path, timeout: float = 10.0) -> None:
    """Wait until staybound has attached its connect hook: it logs it after binding its listener."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} before intercepting: {tail(log)}")
        text = log.read_text(errors="replace") if log.exists() else ""
        if "intercepting: connects to the upstream" in text:
            return
        if "cannot attach the connect hook" in text:
            raise BenchError(f"{what}: {tail(log)}")
        time.sleep(0.02)
    raise BenchError(f"{what}: no connect hook after {timeout:.0f}s: {tail(log)}")


def tail(path: Path, n: int = 6) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:]) or "(empty log)"


# ---------------------------------------------------------------------------------------------
# /proc readings


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15; they cover all threads.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for {pid}")


def machine_busy_s() -> float:
    """user + nice + system seconds of the whole machine (all CPUs) since boot."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[1]) + int(fields[2]) + int(fields[3])) / CLK_TCK


def machine_all_s() -> float:
    """user + nice + system + irq + softirq seconds of the whole machine since boot: also the packet work
    the kernel does in softirq context (loopback delivery, NAT)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7)) / CLK_TCK


def our_cpu_s() -> float:
    """CPU seconds of this script and of its children that have been waited for."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    return ch.ru_utime + ch.ru_stime + me.ru_utime + me.ru_stime


def wait_for_idle(limit: float, threshold: float = 0.25) -> None:
    """Wait (at most `limit` seconds) until the machine, with nothing of ours running, is busy
    less than `threshold` cores over half a second."""
    end = time.monotonic() + limit
    while True:
        b0, o0, t0 = machine_busy_s(), our_cpu_s(), time.monotonic()
        time.sleep(0.5)
        cores = ((machine_busy_s() - b0) - (our_cpu_s() - o0)) / (time.monotonic() - t0)
        if cores < threshold or time.monotonic() >= end:
            return


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


# ---------------------------------------------------------------------------------------------
# Servers and proxies


class Bench:
    def __init__(self, args: argparse.Namespace, sizes: Sizes, tmp: Path) -> None:
        self.args = args
        self.sizes = sizes
        self.tmp = tmp
        self.addrs = Addrs()
        self.seq = 0

    def _path(self, stem: str) -> Path:
        self.seq += 1
        return self.tmp / f"{self.seq:04d}-{stem}"

    # -- upstreams

    def start_redis(self, host: str) -> subprocess.Popen:
        log = self._path("redis.log")
        d = self._path("redis-dir")
        d.mkdir()
        p = PROCS.spawn(["redis-server", "--bind", host, "--port", str(UPSTREAM_PORT),
                         "--save", "", "--appendonly", "no", "--protected-mode", "no",
                         "--maxclients", "10000", "--timeout", "0", "--dir", str(d),
                         "--daemonize", "no", "--logfile", ""], log)
        wait_listening(host, UPSTREAM_PORT, p, "redis-server", log)
        return p

    def start_iperf_server(self, host: str) -> subprocess.Popen:
        log = self._path("iperf3-server.log")
        p = PROCS.spawn(["iperf3", "-s", "-B", host, "-p", str(UPSTREAM_PORT), "-1"], log)
        wait_listening(host, UPSTREAM_PORT, p, "iperf3 -s", log)
        return p

    # -- proxies

    def haproxy_cfg(self, listen: str, upstream: str, threads: int) -> Path:
        cfg = self._path(f"haproxy{threads}.cfg")
        cfg.write_text(f"""global
    nbthread {threads}
    maxconn {HAPROXY_MAXCONN}

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend bench
    bind {listen}:{LISTEN_PORT}
    maxconn {HAPROXY_MAXCONN}
    default_backend bench

backend bench
    # no 'check': no health checks, the pure data path
    server upstream {upstream}:{UPSTREAM_PORT}
""")
        return cfg

    def staybound_cfg(self, listen: str, upstream: str, intercept: str = "") -> Path:
        """`intercept`: "" (explicit), "nat" (an nftables rule) or "connect" (the connect hook)."""
        cfg = self._path("staybound.toml")
        # transparent: the client dials the upstream itself; staybound's nftables rule (or connect hook)
        # sends it to listen.
        extra = "intercept = true\n" if intercept else ""
        top = f'[intercept]\nmethod = "{intercept}"\n' if intercept else ""
        if self.args.own_source:
            # why: a transparent client and staybound's upstream leg otherwise both connect from
            # 127.0.0.1 to the upstream address and port, and share one ephemeral port range and one
            # TIME_WAIT table (README, "Transparent mode"); --own-source gives the leg an address of
            # its own, for the explicit and the transparent contender alike.
            extra += f'source = "{self.addrs.next()}"\n'
        workers = os.environ.get("STAYBOUND_BENCH_WORKERS", "1")
        cfg.write_text(f"""# generated by benches/bench.py
shutdown_grace = "1s"
workers = {workers}

[admin]
listen = "{listen}:{ADMIN_PORT}"

{top}
[[service]]
name = "bench"
listen = "{listen}:{LISTEN_PORT}"
upstream = "{upstream}:{UPSTREAM_PORT}"
max_connections = 10000
{extra}
[service.probe]
# the probe is off so that the numbers are the pure data path
mode = "off"
""")
        return cfg

    def start_proxy(self, c: Contender, listen: str, upstream: str, wrap: list[str] | None = None,
                    start_timeout: float = 10.0) -> subprocess.Popen | None:
        """Starts contender `c` between `listen` and `upstream` and waits until it listens. `wrap`
        is a command prefix (valgrind or strace) the proxy runs under; then it may start slowly."""
        if c.kind == "direct":
            return None
        if c.kind == "haproxy":
            argv = [self.args.haproxy, "-f", str(self.haproxy_cfg(listen, upstream, c.threads)), "-db"]
        else:
            values = {
                "staybound": self.args.staybound, "plain": self.args.plain,
                "listen": f"{listen}:{LISTEN_PORT}", "listen_host": listen,
                "listen_port": str(LISTEN_PORT),
                "upstream": f"{upstream}:{UPSTREAM_PORT}", "upstream_host": upstream,
                "upstream_port": str(UPSTREAM_PORT),
            }
            template = " ".join(c.cmd)
            if "{config}" in template:
                values["config"] = str(self.staybound_cfg(listen, upstream, c.intercept))
            if "{haproxy_cfg}" in template:
                values["haproxy_cfg"] = str(self.haproxy_cfg(listen, upstream, 2))
            argv = [a.format(**values) for a in c.cmd]
        log = self._path(f"{c.name}.log")
        p = PROCS.spawn((wrap or []) + argv, log)
        wait_listening(listen, LISTEN_PORT, p, c.name, log, timeout=start_timeout)
        if c.intercept == "nat":
            wait_intercepting(upstream, p, c.name, log, timeout=start_timeout)
        elif c.intercept == "connect":
            wait_hooked(p, c.name, log, timeout=start_timeout)
        return p

    # -- one measurement: fresh addresses, fresh upstream, fresh proxy

    def measure(self, test: str, c: Contender) -> dict:
        """One measurement, plus how much CPU the rest of the machine used meanwhile (the machine's
        user+system time minus that of this script and its children, all reaped by then)."""
        if self.args.wait_idle > 0:
            wait_for_idle(self.args.wait_idle)
        t0, busy0, ours0 = time.monotonic(), machine_busy_s(), our_cpu_s()
        r = self._measure(test, c)
        wall = time.monotonic() - t0
        r["other_cores"] = max(0.0, (machine_busy_s() - busy0) - (our_cpu_s() - ours0)) / wall
        return r

    def _measure(self, test: str, c: Contender) -> dict:
        listen, upstream = self.addrs.next(), self.addrs.next()
        server = proxy = None
        try:
            server = self.start_iperf_server(upstream) if test.startswith("iperf") \
                else self.start_redis(upstream)
            proxy = self.start_proxy(c, listen, upstream)
            # A transparent proxy is reached through its rule: the client dials the upstream.
            dials_upstream = proxy is None or c.kind == "transparent"
            target = upstream if dials_upstream else listen
            port = UPSTREAM_PORT if dials_upstream else LISTEN_PORT
            if test == "iperf1":
                r = self.iperf(target, port, 1)
            elif test == "iperf4":
                r = self.iperf(target, port, 4)
            elif test == "rss":
                r = self.rss(target, port, upstream, proxy)
            else:
                r = self.redis(test, target, port, proxy)
            if proxy is not None and proxy.poll() is not None:
                raise BenchError(f"{c.name} exited during the test with {proxy.returncode}")
            return r
        finally:
            PROCS.stop(proxy)
            PROCS.stop(server)

    # -- iperf3

    def iperf(self, host: str, port: int, streams: int) -> dict:
        s = self.sizes
        argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(s.iperf_seconds), "-J",
                "-P", str(streams), "--connect-timeout", "3000"]
        if s.iperf_omit:
            argv += ["-O", str(s.iperf_omit)]
        cp = run_bounded(argv, timeout=s.iperf_seconds + s.iperf_omit + 30)
        try:
            data = json.loads(cp.stdout)
        except json.JSONDecodeError:
            raise BenchError(f"iperf3 printed no JSON (rc {cp.returncode}): {cp.stderr.strip()[:300]}")
        if "error" in data:
            raise BenchError(f"iperf3: {data['error']}")
        bps = data["end"]["sum_received"]["bits_per_second"]
        return {"gbps": bps / 1e9}

    # -- redis-benchmark

    def redis(self, test: str, host: str, port: int, proxy: subprocess.Popen | None) -> dict:
        s = self.sizes
        clients, pipeline, keepalive, n = {
            "redis": (50, 1, 1, s.redis_n),
            "pipeline": (50, 16, 1, s.pipeline_n),
            "churn": (50, 1, 0, s.churn_n),
            "lat1": (1, 1, 1, s.lat1_n),
        }[test]
        cpu0 = cpu_seconds(proxy.pid) if proxy else None
        m0 = machine_all_s()
        t0 = time.monotonic()
        got = redis_benchmark(host, port, clients, pipeline, keepalive, n, timeout=240)
        wall = time.monotonic() - t0
        m1 = machine_all_s()
        cpu1 = cpu_seconds(proxy.pid) if proxy else None
        r = {"rps": float(got["rps"]), "p50": float(got["p50_latency_ms"]),
             "p99": float(got["p99_latency_ms"]), "wall_s": wall, "requests": n,
             "machine_per_100k": (m1 - m0) * 100_000 / n}
        if proxy:
            r["cpu_s"] = cpu1 - cpu0
            r["cpu_per_100k"] = (cpu1 - cpu0) * 100_000 / n
        return r

    # -- RSS of idle connections

    def rss(self, host: str, port: int, upstream: str, proxy: subprocess.Popen) -> dict:
        n = self.sizes.rss_conns
        # One connection first, so lazily started threads and pools exist before the baseline.
        warm = hold_connections(host, port, 1, deadline=time.monotonic() + 10)
        for sk in warm:
            sk.close()
        time.sleep(1.0)
        before = rss_kib(proxy.pid)
        fds_before = fd_count(proxy.pid)
        socks: list[socket.socket] = []
        try:
            socks = hold_connections(host, port, n, deadline=time.monotonic() + 120)
            # Every connection answered a PING through the proxy; check the upstream holds them all.
            clients = redis_connected_clients(upstream, UPSTREAM_PORT)
            if clients < n:
                raise BenchError(f"upstream holds {clients} clients, expected {n}")
            time.sleep(1.5)
            after = rss_kib(proxy.pid)
            fds_after = fd_count(proxy.pid)
        finally:
            for sk in socks:
                sk.close()
        return {"kib_per_conn": (after - before) / n, "rss_before_kib": before,
                "rss_after_kib": after, "conns": n, "fds_per_conn": (fds_after - fds_before) / n}

    # -- counted rows: instructions (callgrind) and syscalls (strace) per request

    def counted(self, test: str, c: Contender, workloads: list[str], keep: Path | None,
                tag: str) -> dict:
        """One counted run of `test` ("instr" or "syscalls") for contender `c` over `workloads`.
        Each workload runs twice, with the two sizes of Sizes.counted_n, each time with a fresh
        upstream and a fresh proxy under the tool; the per-request count is the difference of the two
        totals over the difference of the sizes, so start-up, the clients' connection set-up and
        shutdown cancel. Counts come from whole processes (all threads), not time."""
        r: dict = {}
        for wl in workloads:
            n1, n2 = self.sizes.counted_n[wl]
            # Both profiles are kept: their difference, function by function, is where a request's
            # instructions go (callgrind_annotate each, subtract, divide by n2 - n1).
            small, big = (
                self.count_once(test, c, wl, n, keep and keep / f"callgrind.out.{c.name}.{wl}.{tag}.{n}")
                for n in (n1, n2))
            r[wl] = (big["total"] - small["total"]) / (n2 - n1)
            r[f"{wl}_raw"] = {"n": [n1, n2], "total": [small["total"], big["total"]],
                              "wall_s": [small["wall_s"], big["wall_s"]]}
            if test == "syscalls":
                names = set(small["calls"]) | set(big["calls"])
                per = {k: (big["calls"].get(k, 0) - small["calls"].get(k, 0)) / (n2 - n1)
                       for k in names}
                r[f"{wl}_by_call"] = dict(sorted(((k, v) for k, v in per.items() if abs(v) >= 5e-4),
                                                 key=lambda kv: -abs(kv[1])))
                r[f"{wl}_errors"] = (big["errors"] - small["errors"]) / (n2 - n1)
        return r

    def count_once(self, test: str, c: Contender, wl: str, n: int, keep: Path | None) -> dict:
        """One proxy process under callgrind or strace, n requests of workload `wl` through it, then
        SIGTERM; returns the tool's totals once the process has exited."""
        clients, pipeline, keepalive = COUNTED_WORKLOADS[wl]
        listen, upstream = self.addrs.next(), self.addrs.next()
        out = self._path(f"{test}-{c.name}-{wl}-{n}")
        if test == "instr":
            # Whole program, all threads in one count, no toggles: the difference of two sizes does
            # what --toggle-collect would, without naming functions that differ between proxies.
            wrap = ["valgrind", "--tool=callgrind", "--separate-threads=no",
                    f"--callgrind-out-file={out}.%p"]
        else:
            wrap = ["strace", "-f", "-c", "-o", str(out)]
        server = proxy = None
        clean = True
        try:
            server = self.start_redis(upstream)
            proxy = self.start_proxy(c, listen, upstream, wrap=wrap, start_timeout=COUNTED_START_S)
            # A transparent proxy is reached through its rule: the client dials the upstream.
            host, port = (upstream, UPSTREAM_PORT) if c.kind == "transparent" else (listen, LISTEN_PORT)
            t0 = time.monotonic()
            redis_benchmark(host, port, clients, pipeline, keepalive, n, timeout=COUNTED_RUN_S)
            wall = time.monotonic() - t0
            if proxy.poll() is not None:
                raise BenchError(f"{c.name} exited during the test with {proxy.returncode}")
        finally:
            if test == "syscalls":
                clean = PROCS.stop_traced(proxy, grace=COUNTED_STOP_S)
            else:
                PROCS.stop(proxy, grace=COUNTED_STOP_S)
            PROCS.stop(server)
        if test == "instr":
            files = sorted(out.parent.glob(out.name + ".*"))
            if len(files) != 1:
                raise BenchError(f"callgrind wrote {len(files)} profiles for {c.name} (one expected; "
                                 f"did it exit within {COUNTED_STOP_S:.0f}s of SIGTERM?)")
            total = callgrind_total(files[0])
            if keep:
                shutil.copyfile(files[0], keep)
            return {"total": total, "wall_s": wall}
        if not clean or not out.exists():
            raise BenchError(f"strace gave no summary for {c.name} (did it exit within "
                             f"{COUNTED_STOP_S:.0f}s of SIGTERM?)")
        calls, errors = parse_strace_summary(out.read_text())
        return {"total": sum(calls.values()), "calls": calls, "errors": errors, "wall_s": wall}


def callgrind_total(path: Path) -> int:
    """The event total of a callgrind profile (its `totals:` line, else `summary:`)."""
    found = {}
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(("totals:", "summary:")):
                key, _, rest = line.partition(":")
                found[key] = int(rest.split()[0])
    if not found:
        raise BenchError(f"no totals in {path.name}")
    return found.get("totals", found.get("summary"))


def parse_strace_summary(text: str) -> tuple[dict[str, int], int]:
    """Calls per syscall and the failed calls (EAGAIN and the like) from `strace -c` output:
    `% time  seconds  usecs/call  calls  [errors]  syscall` rows, then a `total` row."""
    calls: dict[str, int] = {}
    errors = 0
    for line in text.splitlines():
        f = line.split()
        if len(f) not in (5, 6) or not f[0][0].isdigit() or f[-1] == "total":
            continue
        calls[f[-1]] = calls.get(f[-1], 0) + int(f[3])
        if len(f) == 6:
            errors += int(f[4])
    if not calls:
        raise BenchError("no syscall rows in the strace summary")
    return calls, errors


def redis_benchmark(host: str, port: int, clients: int, pipeline: int, keepalive: int, n: int,
                    timeout: float) -> dict[str, str]:
    """One redis-benchmark GET run; returns its CSV row (rps, latencies) or raises."""
    argv = ["redis-benchmark", "-h", host, "-p", str(port), "-c", str(clients), "-n", str(n),
            "-P", str(pipeline), "-k", str(keepalive), "-t", "get", "--csv", "--precision", "3"]
    cp = run_bounded(argv, timeout=timeout)
    rows = list(csv.reader(io.StringIO(cp.stdout)))
    got = None
    if len(rows) >= 2:
        head = rows[0]
        for row in rows[1:]:
            if row and row[0].upper().startswith("GET"):
                got = dict(zip(head, row))
    if cp.returncode != 0 or got is None:
        raise BenchError(f"redis-benchmark rc {cp.returncode}: "
                         f"{(cp.stdout + cp.stderr).strip()[-300:]}")
    return got


def hold_connections(host: str, port: int, n: int, deadline: float, batch: int = 250
                     ) -> list[socket.socket]:
    """Open n connections in batches, send one PING on each and read its +PONG, and return the
    sockets, open and idle. Raises on any failure or when the deadline passes."""
    done: list[socket.socket] = []
    try:
        while len(done) < n:
            k = min(batch, n - len(done))
            pending = {}
            for _ in range(k):
                sk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sk.setblocking(False)
                pending[sk.fileno()] = sk
                done.append(sk)
                err = sk.connect_ex((host, port))
                if err not in (0, 115):  # EINPROGRESS
                    raise BenchError(f"connect: {os.strerror(err)}")
            poll = select.poll()
            for fd in pending:
                poll.register(fd, select.POLLOUT)
            # connect, then send PING
            waiting = dict(pending)
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"timed out connecting ({len(done) - len(waiting)} of {n})")
                for fd, ev in poll.poll(min(left, 1.0) * 1000):
                    sk = waiting.pop(fd, None)
                    if sk is None:
                        continue
                    err = sk.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err or ev & (select.POLLERR | select.POLLHUP):
                        raise BenchError(f"connect failed: {os.strerror(err) if err else 'hangup'}")
                    sk.send(b"PING\r\n")
                    poll.modify(fd, select.POLLIN)
            # read +PONG
            waiting = dict(pending)
            got: dict[int, bytes] = {fd: b"" for fd in waiting}
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"timed out waiting for PONG ({len(waiting)} outstanding)")
                for fd, ev in poll.poll(min(left, 1.0) * 1000):
                    sk = waiting.get(fd)
                    if sk is None:
                        continue
                    try:
                        data = sk.recv(64)
                    except BlockingIOError:
                        continue
                    if not data:
                        raise BenchError("connection closed before PONG (proxy or upstream refused?)")
                    got[fd] += data
                    if got[fd].endswith(b"\r\n"):
                        if not got[fd].startswith(b"+PONG"):
                            raise BenchError(f"unexpected reply {got[fd][:60]!r}")
                        waiting.pop(fd)
                        poll.unregister(fd)
    except BaseException:
        for sk in done:
            sk.close()
        raise
    return done


def redis_connected_clients(host: str, port: int) -> int:
    with socket.create_connection((host, port), timeout=5) as sk:
        sk.sendall(b"INFO clients\r\n")
        buf = b""
        end = time.monotonic() + 5
        while b"connected_clients:" not in buf or not buf.endswith(b"\r\n"):
            if time.monotonic() > end:
                break
            chunk = sk.recv(4096)
            if not chunk:
                break
            buf += chunk
    for line in buf.decode(errors="replace").splitlines():
        if line.startswith("connected_clients:"):
            return int(line.split(":")[1]) - 1  # not counting this connection
    raise BenchError("no connected_clients in INFO reply")


# ---------------------------------------------------------------------------------------------
# Statistics and reporting


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def row_series(row: Row, results: dict, c: str, nrounds: int) -> dict:
    """Per-round values, and the derived per-round comparison to direct (same round)."""
    vals, cmp_ = [], []
    for r in range(nrounds):
        m = results.get(row.test, {}).get(c, [None] * nrounds)[r]
        v = None if not m else m.get(row.metric)
        vals.append(v)
        if row.kind == "absolute" or c == "direct":
            cmp_.append(None)
            continue
        dm = results.get(row.test, {}).get("direct", [None] * nrounds)[r]
        d = None if not dm else dm.get(row.metric)
        if v is None or d is None:
            cmp_.append(None)
        elif row.kind == "ratio":
            cmp_.append(v / d if d else None)
        else:  # added
            cmp_.append(v - d)
    ratio = []  # ratio to direct for every kind but absolute (the plot uses it for latency too)
    for r in range(nrounds):
        dm = results.get(row.test, {}).get("direct", [None] * nrounds)[r]
        d = None if not dm else dm.get(row.metric)
        v = vals[r]
        ratio.append(v / d if (v is not None and d and row.kind != "absolute") else None)
    return {"values": vals, "cmp": cmp_, "ratio": ratio}


def summary(xs: list) -> tuple[float, float, float] | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return med(xs), min(xs), max(xs)


def fmt_range(fmt: str, s: tuple | None, sign: bool = False, prefix: str = "") -> str:
    if s is None:
        return "—"
    f = (lambda x: ("+" if x >= 0 else "") + fmt.format(x)) if sign else fmt.format
    if f(s[1]) == f(s[2]):  # one round, or all alike as shown
        return f"{prefix}{f(s[0])}"
    return f"{prefix}{f(s[0])} ({f(s[1])}–{f(s[2])})"


def render_markdown(meta: dict, contenders: list[Contender], rows: list[Row], results: dict,
                    orders: list[list[str]], errors: list[str], counted_cs: list[Contender],
                    crows: list[Row], counted: dict) -> str:
    n = len(orders)
    proxies = [c for c in contenders if c.kind != "direct"]
    out = []
    out.append(f"# staybound benchmark — {meta['date']}\n")
    done = ([f"{meta['rounds_done']} round(s) of {meta['rounds']}"] if rows else []) + \
        ([f"{meta['count_runs_done']} counted run(s) of {meta['count_runs']}"] if crows else [])
    out.append(f"{meta['machine']}. {', '.join(done)}, {'quick' if meta['quick'] else 'full'} "
               f"sizes, {meta['elapsed']}.\n")
    shown = contenders + [c for c in counted_cs if c not in contenders]
    out.append("Contenders: " + "; ".join(f"**{c.name}**: {meta['contender_desc'][c.name]}"
                                          for c in shown) + ".\n")
    if rows and n:
        out.extend(render_timed(meta, contenders, proxies, rows, results, orders))
    if crows:
        out.extend(render_counted(meta, counted_cs, crows, counted))
    if meta["notes"]:
        out.append("## Notes\n")
        out.extend(f"- {x}" for x in meta["notes"])
        out.append("")
    if errors:
        out.append("## Errors\n")
        out.extend(f"- {e}" for e in errors)
        out.append("")
    return "\n".join(out)


def render_transparent(contenders: list[Contender], rows: list[Row], results: dict, n: int) -> list[str]:
    """Each transparent contender against explicit staybound, the same round's values side by side: the
    median (min–max) of the per-round ratios transparent/explicit, where direct cancels out. Throughput
    rows: above 1 is faster; cost rows (proxy and machine CPU): above 1 costs more."""
    names = [c.name for c in contenders]
    transparent = [c for c in contenders if c.kind == "transparent"]
    if "staybound" not in names or not transparent:
        return []
    out = ["### Transparent against explicit\n",
           "The median (min–max) over rounds of the per-round ratio transparent ÷ explicit staybound. "
           "Throughput rows: above 1 is faster; CPU rows: above 1 costs more. Machine CPU rows compare "
           "the time added over direct.\n"]
    out.append("| row | " + " | ".join(f"{c.name} ÷ staybound" for c in transparent) + " |")
    out.append("|---|" + "---|" * len(transparent))
    for row in rows:
        if row.kind not in ("ratio", "absolute") and row.metric != "machine_per_100k":
            continue
        cells = [row.title]
        explicit = row_series(row, results, "staybound", n)
        key = "cmp" if row.kind == "added" else "values"
        for c in transparent:
            mine = row_series(row, results, c.name, n)
            per = [a / b for a, b in zip(mine[key], explicit[key]) if a is not None and b]
            cells.append(fmt_range("{:.2f}", summary(per)) if per else "—")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out


def render_timed(meta: dict, contenders: list[Contender], proxies: list[Contender], rows: list[Row],
                 results: dict, orders: list[list[str]]) -> list[str]:
    """The timed rounds: the summary table, the per-round table, the order and load of each round."""
    n = len(orders)
    out = []
    out.append("Each cell: median over rounds (min–max). `÷direct`: the median of the per-round "
               "ratios proxy/direct (min–max); above 1 is faster for throughput rows, for latency "
               "rows it is proxy latency over direct latency. Latency rows show the added "
               "milliseconds (proxy minus direct, same round); the direct column shows direct's own "
               "latency.\n")
    head = ["row", "unit"]
    for c in contenders:
        head.append(c.name)
        if c.kind != "direct":
            head.append("÷direct")
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for row in rows:
        cells = [row.title, row.unit + (" added" if row.kind == "added" else "")]
        for c in contenders:
            ser = row_series(row, results, c.name, n)
            if c.kind == "direct":
                cells.append("—" if row.kind == "absolute" else fmt_range(row.fmt, summary(ser["values"])))
                continue
            if row.kind == "ratio":
                cells.append(fmt_range(row.fmt, summary(ser["values"])))
                cells.append(fmt_range("{:.2f}", summary(ser["ratio"]), prefix="×"))
            elif row.kind == "added":
                cells.append(fmt_range(row.fmt, summary(ser["cmp"]), sign=True))
                cells.append(fmt_range("{:.2f}", summary(ser["ratio"]), prefix="×"))
            else:
                cells.append(fmt_range(row.fmt, summary(ser["values"])))
                cells.append("—")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.extend(render_transparent(contenders, rows, results, n))

    # Per-round comparisons.
    out.append("## Per round\n")
    out.append("Ratio to direct (throughput rows), added ms (latency rows), or the proxy's own value "
               "(RSS, CPU), one column per round.\n")
    out.append("| row | contender | " + " | ".join(f"r{i + 1}" for i in range(n)) + " |")
    out.append("|---|---|" + "---|" * n)
    for row in rows:
        for c in proxies:
            ser = row_series(row, results, c.name, n)
            if row.kind == "ratio":
                cells = ["—" if x is None else f"×{x:.2f}" for x in ser["ratio"]]
            elif row.kind == "added":
                cells = ["—" if x is None else ("+" if x >= 0 else "") + row.fmt.format(x)
                         for x in ser["cmp"]]
            else:
                cells = ["—" if x is None else row.fmt.format(x) for x in ser["values"]]
            out.append(f"| {row.key} | {c.name} | " + " | ".join(cells) + " |")
    loads = meta.get("round_loads", [])
    out.append("| load | 1-minute load average as the round started | " +
               " | ".join(f"{x:.2f}" for x in loads[:n]) + " |")
    out.append("")
    out.append("Order within each round (and the 1-minute load average as it started): " +
               "; ".join(f"r{i + 1}: {', '.join(o)}" +
                         (f" (load {loads[i]:.2f})" if i < len(loads) else "")
                         for i, o in enumerate(orders)) + ".\n")
    if meta.get("max_load") is not None:
        waits = meta.get("round_load_waits", [])
        over = [i for i, x in enumerate(loads[:n]) if x >= meta["max_load"]]
        out.append(f"`--max-load {meta['max_load']:g}`: before each round the harness waited up to "
                   f"{meta['max_load_wait']:.0f} s for the 1-minute load average to fall below it "
                   f"(waited: " + ", ".join(f"r{i + 1} {w:.0f} s" for i, w in enumerate(waits[:n]))
                   + "). " + ("It never did for " + ", ".join(f"r{i + 1} (load {loads[i]:.2f})"
                                                              for i in over)
                              + ": those rounds ran on a busy machine."
                              if over else "Every round started below it.") + "\n")
    if meta.get("rss_sanity"):
        out.append(meta["rss_sanity"] + "\n")
    return out


def render_counted(meta: dict, cands: list[Contender], crows: list[Row], counted: dict
                   ) -> list[str]:
    """The counted rows: per-request counts (median over runs, min–max), each run's value, and the
    syscalls by name."""
    runs = meta["count_runs_done"]
    sizes = {wl: n for wl, n in meta["sizes"]["counted_n"].items() if any(r.metric == wl for r in crows)}
    tools = {"instr": "instructions (callgrind)", "syscalls": "syscalls (strace)"}
    how = {"instr": "`valgrind --tool=callgrind --separate-threads=no` (whole program, every thread)",
           "syscalls": "`strace -f -c`"}
    tests = [t for t in COUNTED_TESTS if any(r.test == t for r in crows)]
    out = ["## Counted per request: " + " and ".join(tools[t] for t in tests) + "\n",
           "Counted outside the timed rounds: a count does not depend on what else the machine does, "
           "so these rows need no quiet machine. Each proxy ran alone under "
           + " or ".join(how[t] for t in tests) + ", twice per workload with a fresh upstream and "
           "proxy each time, with N1 and N2 requests ("
           + "; ".join(f"{wl}: {a:,} and {b:,}" for wl, (a, b) in sizes.items()) + "); a cell is "
           "(count(N2) − count(N1)) / (N2 − N1), so start-up, the 50 clients' connection set-up and "
           "shutdown cancel."
           + (" Instructions are the proxy's user-space ones (not the kernel's work for its syscalls)."
              if "instr" in tests else "")
           + f" Median over {runs} run(s) (min–max).\n"]
    head = ["row", "unit"] + [c.name for c in cands]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for row in crows:
        cells = [row.title, row.unit]
        for c in cands:
            cells.append(fmt_range(row.fmt, summary(counted_values(row, counted, c.name))))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    if runs > 1:
        out.append("Each run's value, and the spread (max − min) / median:\n")
        out.append("| row | contender | " + " | ".join(f"run {i + 1}" for i in range(runs))
                   + " | spread |")
        out.append("|---|---|" + "---|" * (runs + 1))
        for row in crows:
            for c in cands:
                vals = counted_values(row, counted, c.name)
                s = summary(vals)
                spread = f"{(s[2] - s[1]) / s[0] * 100:.2f} %" if s and s[0] else "—"
                out.append(f"| {row.key} | {c.name} | " +
                           " | ".join("—" if v is None else row.fmt.format(v) for v in vals) +
                           f" | {spread} |")
        out.append("")
    sys_rows = [r for r in crows if r.test == "syscalls"]
    for row in sys_rows:
        per = {c.name: {} for c in cands}
        for c in cands:
            for m in counted.get("syscalls", {}).get(c.name, []):
                for k, v in (m or {}).get(f"{row.metric}_by_call", {}).items():
                    per[c.name].setdefault(k, []).append(v)
        names = sorted({k for d in per.values() for k, v in d.items() if abs(med(v)) >= 0.005},
                       key=lambda k: -max(abs(med(per[c][k])) if k in per[c] else 0 for c in per))
        if not names:
            continue
        out.append(f"Syscalls per request by call, {row.short} (median over runs; calls that fail "
                   f"with EAGAIN and the like are counted too):\n")
        out.append("| syscall | " + " | ".join(c.name for c in cands) + " |")
        out.append("|---|" + "---|" * len(cands))
        for k in names:
            out.append(f"| {k} | " + " | ".join(
                f"{med(per[c.name][k]):.3f}" if k in per[c.name] else "—" for c in cands) + " |")
        out.append("")
    return out


def counted_values(row: Row, counted: dict, name: str) -> list:
    """One value per counted run (None where the run failed)."""
    return [None if not m else m.get(row.metric) for m in counted.get(row.test, {}).get(name, [])]


COLORS = {"staybound": "#d9480f", "transparent": "#f08c00", "transparent-hook": "#e8590c", "haproxy-1t": "#1c7ed6", "haproxy-2t": "#5c940d",
          "plain": "#868e96"}
FALLBACK_COLORS = ["#862e9c", "#e67700", "#0b7285", "#495057"]


def nice_axis(vmax: float, ticks: int = 5) -> tuple[float, float]:
    """A round step and the axis top (a multiple of it) that covers vmax."""
    if vmax <= 0:
        vmax = 1.0
    raw = vmax / ticks
    e = 10 ** math.floor(math.log10(raw))
    step = next(m * e for m in (1, 2, 2.5, 5, 10) if m * e >= raw)
    return step, step * math.ceil(vmax / step - 1e-9)


def render_svg(contenders: list[Contender], rows: list[Row], results: dict, nrounds: int,
               title: str, counted_cs: list[Contender], crows: list[Row], counted: dict) -> str:
    """Hand-written SVG: a throughput panel and a latency panel (grouped bars, one group per row,
    one bar per proxy, a dashed line at 1.0 = direct, min–max whiskers), then one small panel per
    absolute proxy cost (RSS, CPU), each on its own scale, then the counted rows (instructions and
    syscalls per request), one small panel per workload."""
    proxies = [c for c in contenders if c.kind != "direct"] if nrounds else []
    legend = proxies + [c for c in counted_cs if c not in proxies]
    color = {c.name: COLORS.get(c.name, FALLBACK_COLORS[i % len(FALLBACK_COLORS)])
             for i, c in enumerate(legend)}
    esc = html.escape
    W, left, right = 980, 64, 20
    parts: list[str] = []
    parts.append(f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="16" '
                 f'font-weight="bold">{esc(title)}</text>')
    # legend
    lx, ly = left, 50
    if proxies:
        parts.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 22}" y2="{ly - 4}" stroke="#000" '
                     f'stroke-dasharray="5,3"/><text x="{lx + 28}" y="{ly}" font-size="12">'
                     f'direct = 1.0</text>')
        lx += 115
    for c in legend:
        parts.append(f'<rect x="{lx}" y="{ly - 11}" width="12" height="12" '
                     f'fill="{color[c.name]}"/><text x="{lx + 17}" y="{ly}" font-size="12">'
                     f'{esc(c.name)}</text>')
        lx += 32 + 7 * len(c.name)
    parts.append(f'<text x="{lx + 8}" y="{ly}" font-size="11" fill="#555">bar: median over '
                 f'rounds (runs); whisker: min–max</text>')

    def panel(prows: list[Row], x0: float, top: float, w: float, h: float, heading: str,
              use_ratio: bool, label_bars: bool, clip: bool = False,
              cands: list[Contender] | None = None) -> float:
        """Draws one panel; returns the y below it. With clip, the scale follows the medians and
        longer whiskers are cut at the top and labelled with their maximum. `cands` (the counted
        contenders) takes the values from the counted runs instead of the rounds."""
        bars = proxies if cands is None else cands
        stats = {}
        vmax = 1.0 if use_ratio else 0.0
        for row in prows:
            for c in bars:
                if cands is not None:
                    s = summary(counted_values(row, counted, c.name))
                else:
                    ser = row_series(row, results, c.name, nrounds)
                    s = summary(ser["ratio"] if use_ratio else ser["values"])
                stats[(row.key, c.name)] = s
                if s:
                    vmax = max(vmax, s[0] * 1.5 if clip else s[2])
        step, ymax = nice_axis(vmax * 1.05)
        parts.append(f'<text x="{x0}" y="{top}" font-size="13" font-weight="bold">'
                     f'{esc(heading)}</text>')
        top += 12
        base = top + h
        sy = lambda v: base - (v / ymax) * h  # noqa: E731
        v = 0.0
        while v <= ymax + 1e-9:
            parts.append(f'<line x1="{x0:.1f}" y1="{sy(v):.1f}" x2="{x0 + w:.1f}" y2="{sy(v):.1f}" '
                         f'stroke="#e9ecef"/><text x="{x0 - 5:.1f}" y="{sy(v) + 4:.1f}" '
                         f'font-size="10" text-anchor="end">{fmt_tick(v, step)}</text>')
            v += step
        parts.append(f'<line x1="{x0:.1f}" y1="{base:.1f}" x2="{x0 + w:.1f}" y2="{base:.1f}" '
                     f'stroke="#000"/><line x1="{x0:.1f}" y1="{top:.1f}" x2="{x0:.1f}" '
                     f'y2="{base:.1f}" stroke="#000"/>')
        group_w = w / len(prows)
        bar_w = min(group_w * 0.8 / max(1, len(bars)), 60.0)
        for gi, row in enumerate(prows):
            gx = x0 + gi * group_w
            x = gx + (group_w - bar_w * len(bars)) / 2
            for c in bars:
                s = stats[(row.key, c.name)]
                cx = x + bar_w / 2
                if s:
                    m, lo, hi = s
                    parts.append(f'<rect x="{x + 1:.1f}" y="{sy(min(m, ymax)):.1f}" '
                                 f'width="{bar_w - 2:.1f}" height="{base - sy(min(m, ymax)):.1f}" '
                                 f'fill="{color[c.name]}"><title>{esc(row.title)}, {esc(c.name)}: '
                                 f'{m:.3f} ({lo:.3f}–{hi:.3f})</title></rect>')
                    if hi > ymax:
                        parts.append(f'<text x="{cx:.1f}" y="{top - 2:.1f}" font-size="9" '
                                     f'text-anchor="middle">↑{hi:.3g}</text>')
                        m, lo, hi = min(m, ymax), min(lo, ymax), ymax
                    if hi > lo:
                        parts.append(f'<path d="M{cx:.1f},{sy(lo):.1f}V{sy(hi):.1f}'
                                     f'M{cx - 3:.1f},{sy(lo):.1f}h6M{cx - 3:.1f},{sy(hi):.1f}h6" '
                                     f'stroke="#000" fill="none"/>')
                    if label_bars:
                        parts.append(f'<text x="{cx:.1f}" y="{sy(hi) - 4:.1f}" font-size="10" '
                                     f'text-anchor="middle">{row.fmt.format(m)}</text>')
                else:
                    parts.append(f'<text x="{cx:.1f}" y="{base - 4:.1f}" font-size="9" '
                                 f'text-anchor="middle" fill="#888">n/a</text>')
                x += bar_w
            if use_ratio:
                for li, line in enumerate(wrap(row.short, max(8, int(group_w / 6.5)))[:3]):
                    parts.append(f'<text x="{gx + group_w / 2:.1f}" y="{base + 14 + 12 * li:.1f}" '
                                 f'font-size="11" text-anchor="middle">{esc(line)}</text>')
        if use_ratio:
            parts.append(f'<line x1="{x0:.1f}" y1="{sy(1.0):.1f}" x2="{x0 + w:.1f}" '
                         f'y2="{sy(1.0):.1f}" stroke="#000" stroke-dasharray="5,3"/>')
        return base + (14 + 12 * 3 if use_ratio else 8)

    y = 80.0
    w_all = W - left - right
    timed = rows if nrounds else []
    thr = [r for r in timed if r.kind == "ratio"]
    lat = [r for r in timed if r.kind == "added"]
    absr = [r for r in timed if r.kind == "absolute"]
    if thr:
        y = panel(thr, left, y, w_all, 220, "Throughput, ratio to direct (higher is better)",
                  True, False) + 18
    if lat:
        y = panel(lat, left, y, w_all, 180, "Latency, ratio to direct (lower is better; the "
                  "table gives the added ms; whiskers past the top are cut)", True, False,
                  clip=True) + 18
    if absr:
        pw = (W - left + 10) / len(absr)
        ybot = y
        for i, row in enumerate(absr):
            ybot = max(ybot, panel([row], left + i * pw, y, pw - 60, 130, row.short, False, True))
        y = ybot + 24
    for test, heading in (("instr", "Instructions per request (callgrind, user space; lower is "
                                    "better)"),
                          ("syscalls", "Syscalls per request (strace -f; lower is better)")):
        crow = [r for r in crows if r.test == test]
        if not crow or not counted_cs:
            continue
        parts.append(f'<text x="{left}" y="{y}" font-size="13" font-weight="bold">'
                     f'{esc(heading)}</text>')
        y += 22
        pw = (W - left + 10) / len(crow)
        ybot = y
        for i, row in enumerate(crow):
            ybot = max(ybot, panel([row], left + i * pw, y, pw - 60, 130, row.short, False, True,
                                   cands=counted_cs))
        y = ybot + 24
    H = int(y)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" font-family="sans-serif">\n'
            f'<rect width="{W}" height="{H}" fill="#fff"/>\n' + "\n".join(parts) + "\n</svg>\n")


def fmt_tick(v: float, step: float) -> str:
    e = math.floor(math.log10(step) + 1e-9)
    mantissa = round(step / 10 ** e, 3)
    decimals = max(0, -e + (1 if mantissa == 2.5 else 0))
    return f"{v:,.{decimals}f}"


def wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for w in text.split():
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    if cur:
        lines.append(cur)
    return lines


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="rows: " + ", ".join(r.key for r in ROWS) +
                                "; groups: " + ", ".join(ONLY_ALIASES) + "; tests: " +
                                ", ".join(TESTS + COUNTED_TESTS))
    p.add_argument("--staybound", default=str(REPO / "target/release/staybound"),
                   help="the staybound release binary (default: target/release/staybound)")
    p.add_argument("--staybound-cmd", default=None,
                   help="command template for the staybound contender instead of "
                        "'{staybound} run --config {config}'; placeholders: {staybound} {config} "
                        "{listen} {listen_host} {listen_port} {upstream} {upstream_host} "
                        "{upstream_port} {haproxy_cfg} (a generated 2-thread HAProxy config). "
                        "E.g. a stand-in: --staybound-cmd 'haproxy -f {haproxy_cfg} -db'")
    p.add_argument("--plain", default=None,
                   help="the plain tokio proxy (examples/plain_proxy.rs; default: "
                        "examples/plain_proxy beside the staybound binary)")
    p.add_argument("--haproxy", default=shutil.which("haproxy") or "haproxy")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="short durations, 1 000 held connections")
    p.add_argument("--only", default="", help="comma-separated rows, groups or tests to run")
    p.add_argument("--contenders",
                   default="direct,staybound,transparent,transparent-hook,haproxy-1t,haproxy-2t,plain",
                   help="comma-separated subset of direct,staybound,transparent,transparent-hook,haproxy-1t,"
                        "haproxy-2t,plain for the timed rounds (transparent needs root and nft; "
                        "transparent-hook, the connect hook, needs root and a cgroup v2)")
    p.add_argument("--counted", default="staybound,haproxy-1t,plain",
                   help="comma-separated proxies for the counted rows (instructions and syscalls "
                        "per request; default staybound,haproxy-1t,plain)")
    p.add_argument("--count-runs", type=int, default=1,
                   help="repeat the counted rows this many times, to show that they repeat "
                        "(default 1)")
    p.add_argument("--keep-profiles", default=None, metavar="DIR",
                   help="keep the callgrind profiles of the counted runs in DIR, named "
                        "callgrind.out.CONTENDER.WORKLOAD.runK.REQUESTS, for callgrind_annotate "
                        "(build with CARGO_PROFILE_RELEASE_STRIP=none for function names)")
    p.add_argument("--rss-conns", type=int, default=None,
                   help="idle connections held for the RSS row (default 8000, 1000 with --quick)")
    p.add_argument("--out", default=str(REPO / "benches/results"),
                   help="directory for latest.md, latest.svg and latest.json")
    p.add_argument("--time-limit", type=float, default=3600,
                   help="seconds; no new round starts after this (default 3600)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each measurement wait up to SECONDS for other processes to use "
                        "less than a quarter of a core (default 0: don't wait)")
    p.add_argument("--max-load", type=float, default=None, metavar="LOAD",
                   help="before each timed round wait (up to --max-load-wait) for the 1-minute load "
                        "average to fall below LOAD; the report says if it never did")
    p.add_argument("--max-load-wait", type=float, default=300, metavar="SECONDS",
                   help="how long --max-load waits before each round (default 300)")
    p.add_argument("--seed", type=int, default=None, help="seed for the address allocator")
    p.add_argument("--own-source", action="store_true",
                   help="staybound (explicit and transparent) connects to the upstream from a fresh "
                        "address of its own (`source`), not from 127.0.0.1")
    p.add_argument("--conntrack", action="store_true",
                   help="track every contender's connections, as a host with a stateful firewall or "
                        f"container networking does: table inet {CONNTRACK_TABLE} (one `ct state` rule "
                        "in the output hook) for the whole run, deleted at the end (needs root and nft)")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.rounds > 50:
        p.error("--rounds must be 1..50")
    if a.count_runs < 1 or a.count_runs > 20:
        p.error("--count-runs must be 1..20")
    if a.plain is None:
        beside = Path(a.staybound).parent / "examples/plain_proxy"
        a.plain = str(beside if beside.exists() else REPO / "target/release/examples/plain_proxy")
    return a


def select_rows(only: str) -> list[Row]:
    if not only:
        return list(ROWS)
    keys: list[str] = []
    for tok in [t.strip() for t in only.split(",") if t.strip()]:
        if tok in ROW_BY_KEY:
            keys.append(tok)
        elif tok in ONLY_ALIASES:
            keys.extend(ONLY_ALIASES[tok])
        elif tok in TESTS or tok in COUNTED_TESTS:
            keys.extend(r.key for r in ROWS if r.test == tok)
        else:
            sys.exit(f"--only: unknown row '{tok}' (rows: {', '.join(ROW_BY_KEY)}; "
                     f"groups: {', '.join(ONLY_ALIASES)}; tests: {', '.join(TESTS + COUNTED_TESTS)})")
    return [r for r in ROWS if r.key in keys]


def tool_version(argv: list[str]) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (cp.stdout + cp.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


def make_contender(w: str, args: argparse.Namespace, notes: list[str]
                   ) -> tuple[Contender, str] | None:
    """The contender named `w` and its description, or None (with a note) if it cannot run here."""

    def skip(why: str) -> None:
        msg = f"{w} skipped: {why}"
        print("note: " + msg, file=sys.stderr)
        notes.append(msg)

    if w == "direct":
        return Contender("direct", "direct"), "the client connects straight to the server"
    if w == "staybound":
        if args.staybound_cmd:
            cmd = shlex.split(args.staybound_cmd)
            standin = "{config}" not in args.staybound_cmd
            if standin:
                notes.append("The staybound column is a stand-in (`--staybound-cmd`), not staybound.")
            return (Contender("staybound", "staybound", cmd=cmd, standin=standin),
                    ("STAND-IN, not staybound: " if standin else "") + f"`{args.staybound_cmd}`")
        if not os.access(args.staybound, os.X_OK):
            skip(f"no executable at {args.staybound} (build it with `cargo build --release`, or pass "
                 f"--staybound)")
            return None
        shown = (os.path.relpath(args.staybound, REPO) if str(args.staybound).startswith(str(REPO))
                 else args.staybound)
        notes.append("staybound runs with `[service.probe] mode = \"off\"`: the numbers are the pure "
                     "data path, without the application keep-alive.")
        return (Contender("staybound", "staybound", cmd=["{staybound}", "run", "--config", "{config}"]),
                f"`{shown} run --config …` ({tool_version([args.staybound, '--version'])}), probe off")
    if w == "transparent-hook":
        if not os.access(args.staybound, os.X_OK):
            skip(f"no executable at {args.staybound}")
        elif os.geteuid() != 0:
            skip("its connect hook needs root (CAP_BPF and CAP_NET_ADMIN)")
        else:
            return (Contender("transparent-hook", "transparent", intercept="connect",
                              cmd=["{staybound}", "run", "--config", "{config}"]),
                    "staybound with `intercept = true` and `[intercept] method = \"connect\"`, probe off: "
                    "the client dials the server's own address and staybound's eBPF program on the cgroup "
                    "v2 root's connect hooks rewrites that connect to its listener (no NAT; the links end "
                    "with the process)")
        return None
    if w == "transparent":
        if not os.access(args.staybound, os.X_OK):
            skip(f"no executable at {args.staybound}")
        elif os.geteuid() != 0:
            skip("its nftables rule needs root (CAP_NET_ADMIN)")
        elif not shutil.which("nft"):
            skip("nft not found (Debian: apt-get install nftables)")
        else:
            return (Contender("transparent", "transparent", intercept="nat",
                              cmd=["{staybound}", "run", "--config", "{config}"]),
                    "staybound with `intercept = true`, probe off: the client dials the server's own "
                    "address and an nftables rule (table `inet staybound`, removed when staybound "
                    "stops) sends it to staybound's listener")
        return None
    if w in ("haproxy-1t", "haproxy-2t"):
        if not shutil.which(args.haproxy):
            skip("haproxy not found (Debian: apt-get install haproxy)")
            return None
        t = 1 if w == "haproxy-1t" else 2
        return (Contender(w, "haproxy", threads=t),
                f"{tool_version([args.haproxy, '-v'])}, mode tcp, nbthread {t}, no health checks")
    if w == "plain":
        if not os.access(args.plain, os.X_OK):
            skip(f"no executable at {args.plain} (build it with `cargo build --release --example "
                 f"plain_proxy`, or pass --plain)")
            return None
        return (Contender("plain", "plain", cmd=["{plain}", "{listen}", "{upstream}"]),
                "`examples/plain_proxy.rs`, a reference floor: accept, connect, "
                "`tokio::io::copy_bidirectional`, tokio multi-thread runtime with 1 worker thread")
    sys.exit(f"bench: unknown contender '{w}'")


CONNTRACK_TABLE = "bench_conntrack"


def conntrack_on() -> None:
    """Makes the kernel track every connection of this network namespace, as any `ct state` rule
    does: a table of the benchmark's own, created fresh (a leftover of the same name is replaced)."""
    if os.geteuid() != 0 or not shutil.which("nft"):
        sys.exit("bench: --conntrack needs root and nft")
    rules = (f"table inet {CONNTRACK_TABLE}\ndelete table inet {CONNTRACK_TABLE}\n"
             f"table inet {CONNTRACK_TABLE} {{\n  chain out {{ type filter hook output priority 0; "
             f"policy accept; ct state established,related accept; }}\n}}\n")
    cp = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True, timeout=30)
    if cp.returncode != 0:
        sys.exit(f"bench: --conntrack: nft failed: {cp.stderr.strip()}")


def conntrack_drops() -> int:
    """Packets conntrack dropped so far (its table full), all CPUs: /proc/net/stat/nf_conntrack."""
    try:
        with open("/proc/net/stat/nf_conntrack") as f:
            head = f.readline().split()
            col = head.index("drop")
            return sum(int(line.split()[col], 16) for line in f if line.strip())
    except (OSError, ValueError, IndexError):
        return 0


def conntrack_off() -> None:
    """Deletes the table conntrack_on made, by its exact name, and nothing else."""
    cp = subprocess.run(["nft", "delete", "table", "inet", CONNTRACK_TABLE], capture_output=True,
                        text=True, timeout=30)
    if cp.returncode != 0:
        print(f"note: could not delete table inet {CONNTRACK_TABLE}: {cp.stderr.strip()}",
              file=sys.stderr)


def wait_for_load(limit: float, wait: float) -> tuple[float, float]:
    """Waits (at most `wait` seconds) until the 1-minute load average is below `limit`; returns the
    load average then and the seconds waited. The load average counts this harness's own work too:
    after a round it has to decay (by e each minute) like any other."""
    t0 = time.monotonic()
    while True:
        load = os.getloadavg()[0]
        waited = time.monotonic() - t0
        if load < limit or waited >= wait:
            return load, waited
        time.sleep(min(5.0, wait - waited))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.seed is not None:
        random.seed(args.seed)
    sizes = Sizes.quick() if args.quick else Sizes.full()
    if args.rss_conns:
        sizes.rss_conns = args.rss_conns
    rows = select_rows(args.only)
    notes: list[str] = []
    ctests = [t for t in COUNTED_TESTS if any(r.test == t for r in rows)]
    for t, tool in (("instr", "valgrind"), ("syscalls", "strace")):
        if t in ctests and not shutil.which(tool):
            msg = f"the {t} rows skipped: {tool} not found (Debian: apt-get install {tool})"
            print("note: " + msg, file=sys.stderr)
            notes.append(msg)
            ctests.remove(t)
    crows = [r for r in rows if r.test in ctests]
    rows = [r for r in rows if r.kind != "counted"]
    tests = [t for t in TESTS if any(r.test == t for r in rows)]

    for tool in ("iperf3", "redis-server", "redis-benchmark"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found (Debian: apt-get install iperf3 redis-server "
                     f"redis-tools)")
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if "rss" in tests and soft < sizes.rss_conns + 100:
        sys.exit(f"bench: the open-file limit ({soft}) is too low to hold {sizes.rss_conns} "
                 f"connections; use --rss-conns")

    # Every contender once, whether it runs in the timed rounds, the counted rows or both.
    wanted = [x.strip() for x in args.contenders.split(",") if x.strip()] if tests else []
    cwanted = [x.strip() for x in args.counted.split(",") if x.strip()] if ctests else []
    pool: dict[str, Contender] = {}
    desc: dict[str, str] = {}
    for w in dict.fromkeys(wanted + cwanted):
        made = make_contender(w, args, notes)
        if made:
            pool[w], desc[w] = made
    contenders = [pool[w] for w in wanted if w in pool]
    counted_cs = [pool[w] for w in cwanted if w in pool and pool[w].kind != "direct"]
    if any(c.kind == "haproxy" for c in pool.values()):
        notes.append(f"HAProxy runs with `maxconn {HAPROXY_MAXCONN}`: `maxconn 20000` needs "
                     f"~40 000 fds and HAProxy refuses to start under this machine's 20 000 "
                     f"open-file limit.")
    if tests and not any(c.kind == "direct" for c in contenders):
        notes.append("direct was not run, so there are no ratios.")
    if not contenders and not counted_cs:
        sys.exit("bench: nothing to run")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = Path(args.keep_profiles) if args.keep_profiles and "instr" in ctests else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="staybound-bench-"))
    bench = Bench(args, sizes, tmp)
    if args.own_source:
        notes.append("`--own-source`: staybound (explicit and transparent) connects to the upstream "
                     "from a fresh 127.77.x.y of its own (`source`).")
    drops0 = 0
    if args.conntrack:
        conntrack_on()
        drops0 = conntrack_drops()
        notes.append(f"`--conntrack`: every contender's connections were tracked (table inet "
                     f"{CONNTRACK_TABLE}, one `ct state established,related accept` rule in the output "
                     f"hook, deleted after the run).")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    results: dict = {}
    counted: dict = {t: {c.name: [] for c in counted_cs} for t in ctests}
    errors: list[str] = []
    orders: list[list[str]] = []
    loads: list[float] = []
    load_waits: list[float] = []
    count_runs_done = 0
    started = time.monotonic()
    interrupted = False
    try:
        # Preflight: every proxy must start and relay one PING, or it is dropped.
        for c in list(pool.values()):
            if c.kind == "direct":
                continue
            try:
                listen, upstream = bench.addrs.next(), bench.addrs.next()
                srv = bench.start_redis(upstream)
                prx = None
                try:
                    prx = bench.start_proxy(c, listen, upstream)
                    at = (upstream, UPSTREAM_PORT) if c.kind == "transparent" else (listen, LISTEN_PORT)
                    for sk in hold_connections(*at, 1, time.monotonic() + 10):
                        sk.close()
                finally:
                    PROCS.stop(prx)
                    PROCS.stop(srv)
            except BenchError as e:
                msg = f"{c.name} dropped: preflight failed: {e}"
                print("note: " + msg, file=sys.stderr)
                notes.append(msg)
                pool.pop(c.name)
                desc.pop(c.name, None)
        contenders = [c for c in contenders if c.name in pool]
        counted_cs = [c for c in counted_cs if c.name in pool]
        counted = {t: {c.name: [] for c in counted_cs} for t in ctests}
        names = [c.name for c in contenders]
        results = {t: {c: [None] * args.rounds for c in names} for t in tests}

        for rnd in range(args.rounds if tests and contenders else 0):
            if time.monotonic() - started > args.time_limit:
                notes.append(f"stopped after {rnd} round(s): --time-limit {args.time_limit:.0f}s")
                break
            if args.max_load is not None:
                load, waited = wait_for_load(args.max_load, args.max_load_wait)
                load_waits.append(waited)
                if load >= args.max_load:
                    print(f"note: load {load:.2f} still above --max-load {args.max_load:g} after "
                          f"{waited:.0f}s; round {rnd + 1} starts anyway", file=sys.stderr)
            k = rnd % len(contenders)
            order = contenders[k:] + contenders[:k]
            orders.append([c.name for c in order])
            loads.append(os.getloadavg()[0])
            print(f"round {rnd + 1}/{args.rounds}: {', '.join(c.name for c in order)}  "
                  f"(load {loads[-1]:.2f})", file=sys.stderr, flush=True)
            for test in tests:
                for c in order:
                    if test == "rss" and c.kind == "direct":
                        continue
                    t0 = time.monotonic()
                    try:
                        m = bench.measure(test, c)
                        results[test][c.name][rnd] = m
                        shown = ", ".join(f"{k2}={v:.4g}" for k2, v in m.items()
                                          if isinstance(v, float))
                        print(f"  {test:8} {c.name:11} {shown}  [{time.monotonic() - t0:.1f}s]",
                              file=sys.stderr, flush=True)
                    except BenchError as e:
                        msg = f"round {rnd + 1}, {test}, {c.name}: {e}"
                        errors.append(msg)
                        print("  error: " + msg, file=sys.stderr, flush=True)

        # Counted rows: after the rounds, since a proxy under valgrind keeps a core busy and would
        # raise the load the rounds wait on. No quiet machine needed: they count, not time.
        for run in range(args.count_runs if counted_cs else 0):
            k = run % len(counted_cs)
            order = counted_cs[k:] + counted_cs[:k]
            print(f"counted run {run + 1}/{args.count_runs}: {', '.join(c.name for c in order)}  "
                  f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
            for test in ctests:
                for c in order:
                    t0 = time.monotonic()
                    try:
                        wls = [r.metric for r in crows if r.test == test]
                        m = bench.counted(test, c, wls, keep, f"run{run + 1}")
                        shown = ", ".join(f"{wl}={m[wl]:,.4g}" for wl in wls)
                        print(f"  {test:8} {c.name:11} {shown}  [{time.monotonic() - t0:.1f}s]",
                              file=sys.stderr, flush=True)
                    except BenchError as e:
                        m = None
                        msg = f"counted run {run + 1}, {test}, {c.name}: {e}"
                        errors.append(msg)
                        print("  error: " + msg, file=sys.stderr, flush=True)
                    counted[test][c.name].append(m)
            count_runs_done += 1
    except KeyboardInterrupt as e:
        interrupted = True
        notes.append(f"interrupted ({e or 'SIGINT'}); partial results")
        print("\ninterrupted; writing partial results", file=sys.stderr)
    finally:
        PROCS.stop_all()
        if args.conntrack:
            dropped = conntrack_drops() - drops0
            conntrack_off()
            if dropped:
                # why: a full conntrack table drops SYNs, and the retransmit a second later is what
                # the affected rows then measure, not the contender.
                notes.append(f"conntrack dropped {dropped} packets during the run (its table was full: "
                             f"net.netfilter.nf_conntrack_max); rows with a new connection per request "
                             f"are not comparable.")
        shutil.rmtree(tmp, ignore_errors=True)

    rounds_done = len(orders)
    for t in results:
        for c in results[t]:
            results[t][c] = results[t][c][:rounds_done]
    for t in counted:
        for c in counted[t]:
            counted[t][c] = (counted[t][c] + [None] * count_runs_done)[:count_runs_done]
    names = [c.name for c in contenders]
    elapsed = time.monotonic() - started
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs, "
                   f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB; "
                   f"{tool_version(['iperf3', '--version'])}; "
                   f"{tool_version(['redis-benchmark', '--version'])}"
                   + (f"; {tool_version(['valgrind', '--version'])}" if "instr" in ctests else "")
                   + (f"; {tool_version(['strace', '-V'])}" if "syscalls" in ctests else ""),
        "rounds": args.rounds, "rounds_done": rounds_done, "quick": args.quick,
        "count_runs": args.count_runs, "count_runs_done": count_runs_done,
        "elapsed": f"{elapsed / 60:.1f} min", "contender_desc": desc, "notes": notes,
        "sizes": sizes.__dict__, "max_load": args.max_load, "max_load_wait": args.max_load_wait,
    }
    if tests:
        meta["notes"].append(
            f"Sizes: iperf3 {sizes.iperf_seconds}s per run"
            f"{f' (+{sizes.iperf_omit}s omitted warm-up)' if sizes.iperf_omit else ''}; "
            f"redis-benchmark GET: {sizes.redis_n:,} requests at 50 clients, {sizes.pipeline_n:,} "
            f"with -P 16, {sizes.churn_n:,} with -k 0, {sizes.lat1_n:,} at 1 client; "
            f"RSS with {sizes.rss_conns:,} idle connections (each answered one PING first). "
            f"Every measurement starts a fresh server and proxy on fresh 127.77.x.y addresses.")
    if "syscalls" in ctests:
        meta["notes"].append(
            "Syscalls: sendto and recvfrom per request are fixed by the proxy's design; epoll_wait "
            "and futex per request depend on how many events each wake-up finds, and strace slows "
            "the proxy (a stop per syscall), so it finds more per wake-up than it would alone: "
            "read those as a lower bound.")
    rss_fds = [m.get("fds_per_conn") for c in names for m in results.get("rss", {}).get(c, []) if m]
    if rss_fds:
        meta["rss_sanity"] = ("RSS check: proxy fds gained per held connection: " +
                              ", ".join(f"{c} {med([m['fds_per_conn'] for m in results['rss'][c] if m]):.2f}"
                                        for c in names if any(results['rss'].get(c, [])))
                              + " (2.00 = one client and one upstream socket each).")
    meta["round_loads"] = loads
    meta["round_load_waits"] = load_waits
    other = [m["other_cores"] for t in results.values() for ms in t.values() for m in ms
             if m and "other_cores" in m]
    if other:
        busy = sum(1 for x in other if x > 0.25)
        meta["notes"].append(
            f"Other processes used a median of {med(other):.2f} and at most {max(other):.2f} of "
            f"the {os.cpu_count()} cores during the measurements; {busy} of {len(other)} "
            f"measurements saw more than a quarter of a core in use by others "
            f"(`other_cores` in latest.json). Such runs are noisier; see the per-round table.")
    md = render_markdown(meta, contenders, rows, results, orders, errors, counted_cs, crows, counted)
    title = (f"staybound vs HAProxy, ratio to direct (median of {rounds_done} round(s))"
             if rounds_done else f"staybound vs HAProxy, counted per request "
                                 f"(median of {count_runs_done} run(s))")
    svg = render_svg(contenders, rows, results, rounds_done, title, counted_cs, crows, counted)
    (out_dir / "latest.md").write_text(md)
    (out_dir / "latest.svg").write_text(svg)
    (out_dir / "latest.json").write_text(json.dumps(
        {"meta": meta, "orders": orders, "errors": errors, "results": results,
         "counted": counted}, indent=1))
    print(md)
    print(f"wrote {out_dir / 'latest.md'}, {out_dir / 'latest.svg'}, {out_dir / 'latest.json'} "
          f"in {elapsed / 60:.1f} min", file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
