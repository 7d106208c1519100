#!/usr/bin/env python3
"""Node agent footprint in a local mesh, against a HashiCorp Serf baseline.

Starts a real Trellis mesh on this machine -- 1 hub, SITES sites, each with
1 relay and NODES_PER_SITE node agents (30 node processes by default), every
member a separate `trellis-*` process with its own certificate -- waits until
the hub reports every node alive, warms up, and measures over a window:

  * RSS per node process: VmRSS from /proc/PID/status, sampled every second,
    mean of the samples;
  * CPU per node process: utime+stime delta from /proc/PID/stat over the
    window, as % of one core;
  * gossip payload bytes sent per node per second: delta of the node's own
    counter `trellis_gossip_sent_bytes_total` (gossip frames, before QUIC,
    UDP and IP overhead);
  * wire bytes: the mesh runs in a network namespace of its own, and the
    bytes transmitted on that namespace's loopback (IP headers included)
    over the window are divided by the number of nodes and seconds.  This
    includes the relays' and the hub's traffic.

Then it does the same with the baseline, measured in the same run: as many
`serf agent` processes as there are Trellis nodes, joined into one cluster in
a namespace of their own.  Serf's payload bytes come from memberlist's own
counters (`memberlist.udp.sent` + `memberlist.tcp.sent`), read from the
agent's in-memory telemetry, which it dumps on SIGUSR1 in 10-second
intervals; for this reason the window starts on a 10-second boundary of the
wall clock and its length is rounded up to a multiple of 10 s.

Every figure is printed with its ratio trellis/serf.  Relay and hub figures
are printed as context; serf has no counterpart.

Needs root for the network namespaces (without it, or with --no-netns,
everything runs on the host loopback and the wire row is n/a).  Uses only
127.0.0.1 inside namespaces it creates and deletes itself; every process it
started is killed (SIGKILL) on exit, failure or Ctrl-C.

    cargo build --release --bins && sudo python3 tests/bench/footprint.py
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import http.client
import json
import math
import os
import platform
import re
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

REPO = Path(__file__).resolve().parents[2]
BINARIES = ("trellis", "trellis-hub", "trellis-relay", "trellis-node")
CLONE_NEWNET = 0x40000000
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERF_INTERVAL = 10  # seconds: serf's in-memory telemetry interval
# Keys of run_trellis's and run_serf's results that hold live processes.
PROCESS_KEYS = ("nodes", "relay_members", "agents")


class BenchError(Exception):
    """A failure with a message meant for the person running the script."""


class Interrupted(BaseException):
    pass


def _on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# processes


@dataclass
class Member:
    name: str
    role: str  # node, relay, hub, serf
    proc: subprocess.Popen
    log: Path
    fields: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid


class Processes:
    """Every process the benchmark starts; all are SIGKILLed by kill_all."""

    def __init__(self) -> None:
        self.members: list[Member] = []

    def spawn(self, name, role, argv, log_path: Path, env=None) -> Member:
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches only this script
            )
        m = Member(name, role, proc, log_path)
        self.members.append(m)
        return m

    def check_alive(self) -> None:
        for m in self.members:
            rc = m.proc.poll()
            if rc is not None:
                raise BenchError(
                    f"{m.name} (pid {m.pid}) exited with status {rc} during the run; "
                    f"last lines of {m.log}:\n{tail(m.log)}"
                )

    def forget(self, m: Member) -> None:
        """Stops watching `m` (a member the caller killed on purpose)."""
        self.members = [x for x in self.members if x is not m]

    def kill_all(self) -> None:
        for m in self.members:
            if m.proc.poll() is None:
                try:
                    m.proc.kill()
                except OSError:
                    pass
        for m in self.members:
            try:
                m.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"warning: {m.name} (pid {m.pid}) did not die after SIGKILL")
        self.members.clear()


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in lines[-n:]) or "    (empty)"


def wait_for(what: str, limit: float, cond, procs: Processes, every: float = 0.2):
    """Polls cond() until it returns something truthy, or fails after limit."""
    deadline = time.monotonic() + limit
    while True:
        value = cond()
        if value:
            return value
        procs.check_alive()
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {limit:.0f} s waiting for {what}")
        time.sleep(every)


def ready_fields(m: Member, needle: str, limit: float, procs: Processes) -> dict:
    """Waits for the log line containing needle; returns its key=value tokens."""

    def find():
        try:
            text = m.log.read_text(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            if needle in line and line.startswith("{"):  # --log-format json
                try:
                    return {k: str(v) for k, v in json.loads(line).items()}
                except ValueError:
                    continue
            if needle in line:
                return dict(
                    tok.split("=", 1) for tok in line.split() if "=" in tok
                ) or {"_": "_"}
        return None

    try:
        m.fields.update(wait_for(f"{m.name} to log {needle!r}", limit, find, procs))
    except BenchError as e:
        raise BenchError(f"{e}; last lines of {m.log}:\n{tail(m.log)}") from None
    return m.fields


# --------------------------------------------------------------------------
# /proc


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    rest = stat[stat.rindex(")") + 2 :].split()
    return int(rest[11]) + int(rest[12])  # utime, stime (fields 14, 15)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def machine() -> dict:
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "model": model,
        "mem_gib": round(mem_gib, 1),
        "kernel": platform.release(),
    }


# --------------------------------------------------------------------------
# network namespaces


class NetNs:
    """A network namespace with loopback up, entered by this (single) thread.

    Child processes started while inside inherit it.  With enabled=False
    everything stays on the host loopback and tx_bytes() returns None.
    """

    def __init__(self, name: str, enabled: bool):
        self.name = name
        self.enabled = enabled
        self.created = False
        self.inside = False
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY) if enabled else None

    def _setns(self, fd: int) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise BenchError(f"setns failed: {os.strerror(err)}")

    def enter(self) -> None:
        if not self.enabled:
            return
        run(["ip", "netns", "add", self.name])
        self.created = True
        run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"])
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            self._setns(fd)
        finally:
            os.close(fd)
        self.inside = True

    def leave(self) -> None:
        if self.inside:
            self._setns(self._home)
            self.inside = False

    def delete(self) -> None:
        self.leave()
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self.created = False

    def tx_bytes(self) -> int | None:
        if not self.inside:
            return None
        # /proc/thread-self/net follows this thread's namespace (unlike /sys).
        with open("/proc/thread-self/net/dev") as f:
            for line in f:
                name, _, data = line.partition(":")
                if name.strip() == "lo":
                    return int(data.split()[8])
        raise BenchError("no lo interface in the namespace")


def run(argv, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise BenchError(
            f"`{' '.join(map(str, argv))}` failed ({r.returncode}): "
            f"{(r.stderr or r.stdout).strip()}"
        )
    return r


# --------------------------------------------------------------------------
# HTTP (plain http.client: no proxies, loopback only)


def http_get(hostport: str, path: str, timeout: float = 5.0) -> str | None:
    host, _, port = hostport.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        return body if resp.status == 200 else None
    except OSError:
        return None
    finally:
        conn.close()


def scrape(hostport: str) -> dict[str, float]:
    body = http_get(hostport, "/metrics")
    if body is None:
        raise BenchError(f"cannot scrape http://{hostport}/metrics")
    out = {}
    for line in body.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        parts = line.split()
        if len(parts) >= 2 and "{" not in parts[0]:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


# --------------------------------------------------------------------------
# the measurement window, common to both systems


@dataclass
class Window:
    seconds: float = 0.0
    start_wall: float = 0.0
    rss_kib: dict = field(default_factory=dict)  # pid -> mean VmRSS
    cpu_pct: dict = field(default_factory=dict)  # pid -> % of one core
    tx_bytes: int | None = None
    tx_seconds: float = 0.0


def next_boundary(after: float) -> float:
    return math.ceil(after / SERF_INTERVAL) * SERF_INTERVAL


def sleep_until(wall: float, procs: Processes) -> None:
    while True:
        left = wall - time.time()
        if left <= 0:
            return
        procs.check_alive()
        time.sleep(min(left, 0.5))


def measure(
    pids: list[int], seconds: int, ns: NetNs, procs: Processes,
    on_start=None, on_end=None, on_second=None,
) -> Window:
    """Measures pids over a window starting on the next 10-s wall boundary.

    on_start runs just before the window's counters are read and on_end just
    after, so that the HTTP they do is not counted in the loopback bytes.
    on_second(k) runs after the RSS sample of second k of the window.
    """
    w = Window(seconds=seconds)
    w.start_wall = next_boundary(time.time() + 1.5)
    sleep_until(w.start_wall - 0.5, procs)
    if on_start:
        on_start()
    sleep_until(w.start_wall, procs)
    tx0, t_tx0 = ns.tx_bytes(), time.monotonic()
    cpu0, t_c0 = {p: cpu_ticks(p) for p in pids}, time.monotonic()
    samples: dict[int, list[int]] = {p: [] for p in pids}
    end_wall = w.start_wall + seconds
    tick = w.start_wall
    while True:
        for p in pids:
            samples[p].append(rss_kib(p))
        if on_second:
            on_second(round(tick - w.start_wall))
        tick += 1.0
        if tick >= end_wall:
            break
        sleep_until(tick, procs)
    sleep_until(end_wall, procs)
    cpu1, t_c1 = {p: cpu_ticks(p) for p in pids}, time.monotonic()
    tx1, t_tx1 = ns.tx_bytes(), time.monotonic()
    if on_end:
        on_end()
    procs.check_alive()
    elapsed = t_c1 - t_c0
    for p in pids:
        w.rss_kib[p] = statistics.fmean(samples[p])
        w.cpu_pct[p] = (cpu1[p] - cpu0[p]) / CLK_TCK / elapsed * 100.0
    if tx0 is not None and tx1 is not None:
        w.tx_bytes = tx1 - tx0
        w.tx_seconds = t_tx1 - t_tx0
    return w


# --------------------------------------------------------------------------
# Trellis


def run_trellis(args, work: Path, ns: NetNs, procs: Processes,
                node_extra=None, env_extra=None) -> dict:
    """Starts the mesh, measures the window and returns the figures, leaving
    every process running (the caller kills them).  `node_extra(name)` is
    appended to each node's config; `env_extra` is added to every process's
    environment."""
    bindir = args.target_dir
    trellis = str(bindir / "trellis")
    ca, certs = work / "ca", work / "certs"
    sites = [f"site-{i}" for i in range(1, args.sites + 1)]
    env = {**os.environ, "NO_COLOR": "1", "TRELLIS_LOG": args.trellis_log, **(env_extra or {})}

    log(f"trellis: issuing {2 + args.sites * (args.nodes_per_site + 1)} certificates")
    run([trellis, "ca", "init", "--dir", str(ca)])

    def issue(role, name, site=None):
        argv = [trellis, "ca", "issue", "--dir", str(ca), "--out", str(certs),
                "--role", role, "--region", "bench", "--name", name]
        if site:
            argv += ["--site", site]
        run(argv)

    issue("hub", "hub-1")
    for s in sites:
        issue("relay", f"{s}-relay", s)
        for n in range(1, args.nodes_per_site + 1):
            issue("node", f"{s}-n{n:02d}", s)

    def config(name, body):
        path = work / f"{name}.toml"
        path.write_text(
            f'[identity]\nca = "{ca / "ca.crt"}"\n'
            f'cert = "{certs / (name + ".crt")}"\nkey = "{certs / (name + ".key")}"\n'
            + body
        )
        return str(path)

    def start(name, role, binary, body):
        cfg = config(name, body)
        return procs.spawn(name, role, [str(bindir / binary), "--config", cfg],
                           work / f"{name}.log", env)

    log("trellis: starting hub and relays")
    hub = start("hub-1", "hub", "trellis-hub",
                '[uplink]\nlisten = "127.0.0.1:0"\n[api]\nlisten = "127.0.0.1:0"\n')
    hf = ready_fields(hub, "hub ready", args.start_timeout, procs)
    uplink, api = hf.get("uplink"), hf.get("api", "").removeprefix("http://")
    if not uplink or not api:
        raise BenchError(f"cannot parse uplink=/api= from the hub's ready line: {hf}")

    relays = []
    for s in sites:
        relays.append(start(
            f"{s}-relay", "relay", "trellis-relay",
            f'[gossip]\nlisten = "127.0.0.1:0"\n[uplink]\nhubs = ["{uplink}"]\n'
            '[metrics]\nlisten = "127.0.0.1:0"\n'))
    seeds = {}
    for s, r in zip(sites, relays):
        rf = ready_fields(r, "relay ready", args.start_timeout, procs)
        if "gossip" not in rf or "metrics" not in rf:
            raise BenchError(f"cannot parse gossip=/metrics= from {r.name}'s ready line")
        seeds[s] = rf["gossip"]

    log(f"trellis: starting {args.sites * args.nodes_per_site} nodes")
    nodes = []
    for s in sites:
        for n in range(1, args.nodes_per_site + 1):
            nodes.append(start(
                f"{s}-n{n:02d}", "node", "trellis-node",
                f'[gossip]\nlisten = "127.0.0.1:0"\nseeds = ["{seeds[s]}"]\n'
                '[metrics]\nlisten = "127.0.0.1:0"\n'
                + (node_extra(f"{s}-n{n:02d}") if node_extra else "")))
    for m in nodes:
        if "metrics" not in ready_fields(m, "node ready", args.start_timeout, procs):
            raise BenchError(f"cannot parse metrics= from {m.name}'s ready line")

    total = len(nodes)

    def fleet():
        body = http_get(api, "/api/v1/fleet")
        try:
            return json.loads(body) if body else None
        except ValueError:
            return None

    def all_alive():
        f = fleet()
        return f if f and f.get("totals", {}).get("nodes_alive") == total else None

    log(f"trellis: waiting for the hub to report {total} nodes alive")
    t0 = time.monotonic()
    wait_for(f"the hub to report {total} nodes alive (GET /api/v1/fleet)",
             args.converge_timeout, all_alive, procs, every=1.0)
    want = args.nodes_per_site + 1  # the site's nodes and its relay

    def every_node_sees_site():
        return all(
            scrape(m.fields["metrics"]).get("trellis_gossip_members_alive") == want
            for m in nodes
        )

    wait_for(f"every node to see {want} site members alive",
             args.converge_timeout, every_node_sees_site, procs, every=1.0)
    log(f"trellis: converged in {time.monotonic() - t0:.1f} s; warming up {args.warmup} s")
    sleep_until(time.time() + args.warmup, procs)

    counters: dict[str, list] = {}
    watched = nodes + relays

    def snap(key):
        counters[key] = [
            (time.monotonic(), scrape(m.fields["metrics"])) for m in watched
        ]

    log(f"trellis: measuring over {args.seconds} s")
    w = measure([m.pid for m in nodes + relays + [hub]], args.seconds, ns, procs,
                on_start=lambda: snap("start"), on_end=lambda: snap("end"))

    end_fleet = fleet() or {}
    alive_end = end_fleet.get("totals", {}).get("nodes_alive")
    dead_end = end_fleet.get("totals", {}).get("nodes_dead")

    def rate(i, name):
        (ta, a), (tb, b) = counters["start"][i], counters["end"][i]
        return (b.get(name, 0) - a.get(name, 0)) / (tb - ta)

    payload = [rate(i, "trellis_gossip_sent_bytes_total") for i in range(len(nodes))]
    msgs = [rate(i, "trellis_gossip_messages_sent_total") for i in range(len(nodes))]
    relay_payload = [rate(len(nodes) + i, "trellis_gossip_sent_bytes_total")
                     for i in range(len(relays))]
    return {
        "window": w,
        "nodes": nodes,
        "relay_members": relays,
        "members": [m.pid for m in nodes],
        "relays": [m.pid for m in relays],
        "hub": hub.pid,
        "payload": payload,
        "msgs": msgs,
        "relay_payload": relay_payload,
        "alive_end": alive_end,
        "dead_end": dead_end,
        "log_bytes": sum(m.log.stat().st_size for m in nodes),
    }


# --------------------------------------------------------------------------
# Serf


class PortPicker:
    """Ports free for both TCP and UDP on 127.0.0.1 (serf binds both).

    They are taken below the kernel's ephemeral range, so that connections
    the agents open (joins, push-pull) cannot take a port before the agent
    meant to listen on it has bound it.
    """

    def __init__(self, base: int = 17000):
        try:
            low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
        except (OSError, ValueError, IndexError):
            low = 32768
        self.next, self.limit = base, low

    def take(self) -> int:
        while self.next < self.limit:
            port, self.next = self.next, self.next + 1
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
                        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    t.bind(("127.0.0.1", port))
                    u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
        raise BenchError(f"no free port on 127.0.0.1 below {self.limit}")


DUMP_RE = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \+0000 UTC\]\[(\w)\] '([^']+)': (.*)$"
)


def serf_intervals(path: Path) -> dict[float, dict[str, float]]:
    """Counter sums per 10-s interval from the agent's SIGUSR1 dumps."""
    out: dict[float, dict[str, float]] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = DUMP_RE.match(line.strip())
        if not m:
            continue
        ts = dt.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").replace(
            tzinfo=dt.timezone.utc).timestamp()
        row = out.setdefault(ts, {})  # a later dump of the same interval wins
        if m[2] == "C":
            s = re.search(r"Sum: ([0-9.eE+-]+)", m[4])
            if s:
                row[m[3]] = float(s[1])
    return out


def run_serf(args, work: Path, ns: NetNs, procs: Processes, count: int,
             extra_argv=(), env_extra=None) -> dict:
    """Starts `count` agents, measures the window and returns the figures,
    leaving the agents running (the caller kills them)."""
    serf = shutil.which("serf")
    env = {**os.environ, "TZ": "UTC", **(env_extra or {})}  # the dump prints local time
    agents = []
    first = None
    ports = PortPicker()
    log(f"serf: starting {count} agents")
    for i in range(count):
        bind, rpc = ports.take(), ports.take()
        argv = [serf, "agent", f"-node=s{i:02d}", f"-bind=127.0.0.1:{bind}",
                f"-rpc-addr=127.0.0.1:{rpc}", "-log-level=info", *extra_argv]
        if first is not None:
            argv.append(f"-join=127.0.0.1:{first}")
        m = procs.spawn(f"serf-s{i:02d}", "serf", argv, work / f"serf-s{i:02d}.log", env)
        m.fields = {"rpc": f"127.0.0.1:{rpc}"}
        agents.append(m)
        if first is None:
            first = bind
            ready_fields(m, "Serf agent running", args.start_timeout, procs)

    def alive_seen(m):
        try:
            r = subprocess.run(
                [serf, "members", "-status=alive", f"-rpc-addr={m.fields['rpc']}"],
                capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return -1
        return len(r.stdout.splitlines()) if r.returncode == 0 else -1

    log(f"serf: waiting for every agent to see {count} members alive")
    t0 = time.monotonic()
    wait_for(f"serf agent s00 to see {count} members alive",
             args.converge_timeout, lambda: alive_seen(agents[0]) == count, procs, every=1.0)
    wait_for(f"every serf agent to see {count} members alive", args.converge_timeout,
             lambda: all(alive_seen(m) == count for m in agents), procs, every=1.0)
    log(f"serf: converged in {time.monotonic() - t0:.1f} s; warming up {args.warmup} s")
    sleep_until(time.time() + args.warmup, procs)

    log(f"serf: measuring over {args.seconds} s")
    pids = [m.pid for m in agents]
    # The in-memory sink keeps one minute of intervals: dump every 30 s
    # during long windows so that no interval of the window is lost.
    def dump_now(k):
        if args.seconds > 40 and k > 0 and k % 30 == 0:
            for m in agents:
                os.kill(m.pid, signal.SIGUSR1)

    w = measure(pids, args.seconds, ns, procs, on_second=dump_now)
    end_wall = w.start_wall + args.seconds
    # SIGUSR1 dumps every finished interval; wait until the window's last
    # interval is finished for all agents (some slack for a busy machine).
    sleep_until(end_wall + 2.0, procs)
    for m in agents:
        os.kill(m.pid, signal.SIGUSR1)
    time.sleep(1.5)
    alive_end = alive_seen(agents[0])

    wanted = [w.start_wall + k * SERF_INTERVAL for k in range(args.seconds // SERF_INTERVAL)]
    payload, missing = [], []
    for m in agents:
        iv = serf_intervals(m.log)
        got = [iv.get(ts) for ts in wanted]
        if any(g is None for g in got):
            missing.append(m.name)
            continue
        sent = sum(g.get("serf-agent.memberlist.udp.sent", 0.0)
                   + g.get("serf-agent.memberlist.tcp.sent", 0.0) for g in got)
        payload.append(sent / args.seconds)
    if missing:
        log(f"serf: telemetry intervals missing for {len(missing)} agents "
            f"({', '.join(missing[:5])}...); serf payload bytes reported as n/a")
        payload = []
    return {"window": w, "agents": agents, "members": pids, "payload": payload,
            "alive_end": alive_end}


def serf_version() -> str:
    try:
        r = subprocess.run(["serf", "version"], capture_output=True, text=True, timeout=10)
        return r.stdout.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def stale_binaries(bindir: Path) -> bool:
    """Whether a source file of the workspace is newer than the binaries."""
    built = min((bindir / b).stat().st_mtime for b in BINARIES)
    sources = [REPO / "Cargo.lock", REPO / "Cargo.toml"]
    for crate in ("node", "relay", "hub"):
        sources += [REPO / crate / "Cargo.toml", *(REPO / crate / "src").rglob("*.rs")]
    return any(p.is_file() and p.stat().st_mtime > built for p in sources)


def trellis_revision() -> str:
    try:
        rev = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]
                    ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (BenchError, OSError):
        return "unknown"


# --------------------------------------------------------------------------
# report


def mib(kib: float) -> float:
    return kib / 1024.0


def fmt(v, digits=1) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def ratio(a, b) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def report(args, tr: dict, sf: dict | None) -> str:
    n = len(tr["members"])
    tw: Window = tr["window"]
    sw: Window | None = sf["window"] if sf else None

    def col(w, pids, what):
        vals = [(w.rss_kib if what == "rss" else w.cpu_pct)[p] for p in pids]
        if what == "rss":
            vals = [mib(v) for v in vals]
        return statistics.fmean(vals), max(vals)

    t_rss, t_cpu = col(tw, tr["members"], "rss"), col(tw, tr["members"], "cpu")
    s_rss = col(sw, sf["members"], "rss") if sf else (None, None)
    s_cpu = col(sw, sf["members"], "cpu") if sf else (None, None)

    def wire(w, members):
        if w is None or w.tx_bytes is None:
            return None
        return w.tx_bytes / members / w.tx_seconds

    t_wire = wire(tw, n)
    s_wire = wire(sw, len(sf["members"])) if sf else None
    t_pay = (statistics.fmean(tr["payload"]), max(tr["payload"]))
    s_pay = ((statistics.fmean(sf["payload"]), max(sf["payload"]))
             if sf and sf["payload"] else (None, None))

    head = f"footprint, {n} members, {args.seconds} s window"
    rows = [
        ("RSS per member (MiB), mean", t_rss[0], s_rss[0], 1),
        ("RSS per member (MiB), max", t_rss[1], s_rss[1], 1),
        ("CPU per member (% of one core), mean", t_cpu[0], s_cpu[0], 2),
        ("CPU per member (% of one core), max", t_cpu[1], s_cpu[1], 2),
        ("bytes sent per member per second (wire, lo)", t_wire, s_wire, 0),
        ("gossip payload bytes sent per member per s, mean", t_pay[0], s_pay[0], 0),
        ("gossip payload bytes sent per member per s, max", t_pay[1], s_pay[1], 0),
    ]
    w0, w1 = 50, 14
    lines = [f"{head:<{w0}}{'trellis-node':>{w1}}{'serf agent':>{w1}}"
             f"{'ratio (trellis/serf)':>{w1 + 8}}"]
    for label, a, b, d in rows:
        lines.append(f"{label:<{w0}}{fmt(a, d):>{w1}}{fmt(b, d):>{w1}}{ratio(a, b):>{w1 + 8}}")
    relay_rss = [mib(tw.rss_kib[p]) for p in tr["relays"]]
    relay_cpu = [tw.cpu_pct[p] for p in tr["relays"]]
    lines += [
        "",
        "context (Trellis only, no serf counterpart)",
        f"  relay, mean of {len(relay_rss)}: RSS {statistics.fmean(relay_rss):.1f} MiB, "
        f"CPU {statistics.fmean(relay_cpu):.2f} % of one core, "
        f"gossip payload {statistics.fmean(tr['relay_payload']):,.0f} B/s",
        f"  hub: RSS {mib(tw.rss_kib[tr['hub']]):.1f} MiB, "
        f"CPU {tw.cpu_pct[tr['hub']]:.2f} % of one core",
        f"  trellis-node gossip messages sent per second, mean: "
        f"{statistics.fmean(tr['msgs']):.1f}",
        f"  all {n} trellis-node processes together: "
        f"{sum(tw.cpu_pct[p] for p in tr['members']):.1f} % of one core, "
        f"{sum(mib(tw.rss_kib[p]) for p in tr['members']):.0f} MiB RSS",
    ]
    if sf:
        lines.append(
            f"  all {len(sf['members'])} serf agents together: "
            f"{sum(sw.cpu_pct[p] for p in sf['members']):.1f} % of one core, "
            f"{sum(mib(sw.rss_kib[p]) for p in sf['members']):.0f} MiB RSS")
    lines += [
        "",
        "wire: IP bytes transmitted on the loopback of the system's own network "
        "namespace over the window / members / s;",
        "      for Trellis this includes the relays' and the hub's traffic "
        "(whole mesh / nodes), for serf only agents.",
        "payload: Trellis counter trellis_gossip_sent_bytes_total (frames before QUIC); "
        "serf memberlist.udp.sent+tcp.sent",
        "      from the agent's telemetry (packets before UDP/TCP). Neither includes "
        "transport or IP headers.",
    ]
    if tw.tx_bytes is None:
        lines.append("wire row is n/a: no network namespace (needs root; see --no-netns)")
    if sf is None:
        lines.append("no baseline was run (--no-baseline): no ratio could be computed")
    checks = [f"trellis: hub reported {tr['alive_end']} nodes alive, "
              f"{tr['dead_end']} dead after the window"]
    if sf:
        checks.append(f"serf: s00 saw {sf['alive_end']} members alive after the window")
    lines.append("; ".join(checks))
    return "\n".join(lines)


# --------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Measure the Trellis node agent's footprint (RSS, CPU, gossip "
        "bytes) in a local mesh of real processes, against HashiCorp Serf agents "
        "measured the same way in the same run.",
        epilog="Build first: cargo build --release --bins. Baseline: apt-get install serf. "
        "Run as root so that each system gets its own network namespace "
        "(needed for the wire-level byte count).",
    )
    p.add_argument("--seconds", type=int, default=30,
                   help="measurement window in seconds, rounded up to a multiple of "
                        "10 (default 30)")
    p.add_argument("--warmup", type=int, default=15,
                   help="seconds to wait after the mesh converged (default 15)")
    p.add_argument("--sites", type=int, default=3, help="Trellis sites (default 3)")
    p.add_argument("--nodes-per-site", type=int, default=10,
                   help="Trellis nodes per site (default 10); serf runs "
                        "sites x nodes-per-site agents")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip serf (no ratio can be computed)")
    p.add_argument("--no-netns", action="store_true",
                   help="run on the host loopback, without network namespaces "
                        "(wire-level bytes become n/a)")
    p.add_argument("--target-dir", type=Path, default=REPO / "target" / "release",
                   help="where the trellis binaries are (default target/release)")
    p.add_argument("--trellis-log", default="info",
                   help="TRELLIS_LOG for the Trellis processes (default info)")
    p.add_argument("--start-timeout", type=float, default=30,
                   help="seconds to wait for each process to be ready (default 30)")
    p.add_argument("--converge-timeout", type=float, default=120,
                   help="seconds to wait for membership to converge (default 120)")
    p.add_argument("--json", type=Path, help="also write the raw figures to this file")
    p.add_argument("--keep", action="store_true",
                   help="keep the working directory (certificates, configs, logs)")
    args = p.parse_args(argv)
    if args.seconds < 1 or args.warmup < 0 or args.sites < 1 or args.nodes_per_site < 1:
        p.error("--seconds, --sites and --nodes-per-site must be positive")
    args.seconds = math.ceil(args.seconds / SERF_INTERVAL) * SERF_INTERVAL
    args.target_dir = args.target_dir.resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [b for b in BINARIES if not (args.target_dir / b).is_file()]
    if missing:
        print(f"error: {', '.join(missing)} not found in {args.target_dir}: "
              "run cargo build --release --bins", file=sys.stderr)
        return 2
    stale = stale_binaries(args.target_dir)
    if stale:
        print("warning: sources are newer than the binaries in "
              f"{args.target_dir}; run cargo build --release --bins", file=sys.stderr)
    if not args.no_baseline and shutil.which("serf") is None:
        print("error: serf not found: apt-get install serf "
              "(or pass --no-baseline to measure Trellis alone, without ratios)",
              file=sys.stderr)
        return 2
    use_netns = not args.no_netns
    if use_netns and (os.geteuid() != 0 or shutil.which("ip") is None):
        print("warning: network namespaces need root and iproute2; running on the host "
              "loopback, the wire-level row will be n/a", file=sys.stderr)
        use_netns = False

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    info = machine()
    revision = trellis_revision()
    work = Path(tempfile.mkdtemp(prefix="trellis-footprint-"))
    tag = f"tfp{os.getpid()}"
    procs = Processes()
    namespaces: list[NetNs] = []
    ok = False
    try:
        ns = NetNs(f"{tag}-trellis", use_netns)
        namespaces.append(ns)
        ns.enter()
        try:
            tr = run_trellis(args, work, ns, procs)
        finally:
            procs.kill_all()
            ns.delete()
        sf = None
        if not args.no_baseline:
            ns = NetNs(f"{tag}-serf", use_netns)
            namespaces.append(ns)
            ns.enter()
            try:
                sf = run_serf(args, work, ns, procs, len(tr["members"]))
            finally:
                procs.kill_all()
                ns.delete()
        table = report(args, tr, sf)
        print(f"date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
              f"machine: {info['cpus']} CPUs ({info['model']}), {info['mem_gib']} GiB RAM, "
              f"Linux {info['kernel']}")
        print(f"trellis {revision} "
              f"({'BINARIES OLDER THAN SOURCES' if stale else 'release build'}); "
              f"{'serf ' + serf_version() if sf else 'no baseline'}; "
              f"{args.sites} sites x {args.nodes_per_site} nodes + 1 relay each + 1 hub; "
              f"warm-up {args.warmup} s")
        print()
        print(table)
        if args.json:
            def win(w):
                return None if w is None else {
                    "seconds": w.seconds, "rss_kib": list(w.rss_kib.values()),
                    "cpu_pct": list(w.cpu_pct.values()), "tx_bytes": w.tx_bytes,
                    "tx_seconds": w.tx_seconds}
            raw = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                   "trellis": {k: (win(v) if k == "window" else v) for k, v in tr.items()
                               if k not in PROCESS_KEYS},
                   "serf": None if sf is None else
                   {k: (win(v) if k == "window" else v) for k, v in sf.items()
                    if k not in PROCESS_KEYS}}
            args.json.write_text(json.dumps(raw, indent=2))
        ok = True
        return 0
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        procs.kill_all()
        for ns in namespaces:
            ns.delete()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"working directory (logs, configs): {work}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
