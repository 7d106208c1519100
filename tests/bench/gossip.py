#!/usr/bin/env python3
"""Site gossip against HashiCorp Serf, member for member, at several sizes.

For each size N (25, 50, 100, 200 by default) it starts, one after the other
and never at the same time:

  * Trellis: one site of N `trellis-node` processes and its relay (plus a
    hub, which the relay reports to), every member its own process with its
    own certificate;
  * Serf: N `serf agent` processes joined into one cluster;

each in a network namespace of its own on 127.0.0.1, and measures, with the
same code for both:

  1. footprint per member over a window (see footprint.py, which this script
     drives): RSS, CPU, bytes sent per second on the wire and as payload;
  2. propagation: the time for a changed value to reach every other member.
     Serf: `serf tags -set` on one agent, timed from the command's return to
     the `member-update` event at every other agent.  Trellis: a check on one
     node is made to fail (and then pass again), timed from the node's log
     line saying it published the new status to the log line of every other
     site member saying it saw that status.  Both ends are log or event
     timestamps taken on this machine's clock;
  3. failure detection: a member is killed with SIGKILL, and the time from
     the kill to the moment the last other member reports it failed is
     taken (Serf: its `member-failed` event; Trellis: the member's log line
     "site member is unreachable").  Several kills, one after another.
  4. false failures: then a share of every packet in the namespace (5 % by
     default) is dropped with nftables for a window, and the failure reports
     about members that are alive are counted.

Every process it started is killed on exit, failure or Ctrl-C, and every
namespace is deleted.  Needs root for the namespaces (see footprint.py).

    cargo build --release --bins && sudo python3 tests/bench/gossip.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import footprint as fp  # noqa: E402

# The serf event handler: one line per member named in the event, with the
# time the agent ran the handler.  Serf passes the event's members on stdin.
HANDLER = """#!/bin/sh
ts=$(date +%s.%N)
while read -r name rest; do
  echo "$ts $SERF_EVENT $name" >> "$GOSSIP_BENCH_EVENTS/$SERF_SELF_NAME"
done
"""


class LogTail:
    """New complete lines of a growing file, read from where it was left."""

    def __init__(self, path: Path):
        self.path, self.offset, self.rest = path, 0, b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.rest + data
        *done, self.rest = data.split(b"\n")
        return [d.decode(errors="replace") for d in done]


def parse_ts(s: str) -> float:
    """An RFC 3339 timestamp (as tracing writes it) as Unix seconds."""
    s = s.rstrip("Z")
    frac = 0.0
    if "." in s:
        s, f = s.split(".", 1)
        frac = float("0." + f)
    return dt.datetime.fromisoformat(s).replace(tzinfo=dt.timezone.utc).timestamp() + frac


def trellis_events(line: str):
    """(unix time, kind, member, value) of a Trellis JSON log line that
    matters here, else None."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    f = rec.get("fields", rec)  # the JSON format flattens the fields
    msg = f.get("message", "")
    if msg.startswith("site member is unreachable"):
        return parse_ts(rec["timestamp"]), "failed", f.get("member"), None
    if msg == "site member's status seen changed":
        return parse_ts(rec["timestamp"]), "status", f.get("member"), f.get("status")
    if msg == "published this member's health status":
        return parse_ts(rec["timestamp"]), "published", None, f.get("status")
    return None


def serf_events(line: str):
    parts = line.split()
    if len(parts) != 3:
        return None
    kind = {"member-failed": "failed", "member-update": "status"}.get(parts[1])
    return (float(parts[0]), kind, parts[2], None) if kind else None


class Observers:
    """Every member's event stream, polled from its log or event file."""

    def __init__(self, sources: dict[str, Path], parse):
        self.tails = {name: LogTail(p) for name, p in sources.items()}
        self.parse = parse
        self.events: dict[str, list] = {name: [] for name in sources}

    def poll(self) -> None:
        for name, t in self.tails.items():
            for line in t.lines():
                e = self.parse(line)
                if e:
                    self.events[name].append(e)

    def first(self, who: str, kind: str, member, value, after: float):
        for ts, k, m, v in self.events[who]:
            if k == kind and m == member and (value is None or v == value) and ts >= after:
                return ts
        return None


def wait_all(obs: Observers, who: list[str], kind: str, member, value, after: float,
             limit: float, procs: fp.Processes) -> dict[str, float | None]:
    """When each member in `who` reported (kind, member, value) after
    `after`; None for those that did not within `limit` seconds."""
    seen: dict[str, float | None] = {w: None for w in who}
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        procs.check_alive()
        obs.poll()
        for w in who:
            if seen[w] is None:
                seen[w] = obs.first(w, kind, member, value, after)
        if all(v is not None for v in seen.values()):
            break
        time.sleep(0.1)
    return seen


def spread(seen: dict[str, float | None], since: float) -> tuple[float | None, int]:
    """(seconds until the last member saw it, members that never did)."""
    missed = sum(1 for v in seen.values() if v is None)
    got = [v for v in seen.values() if v is not None]
    return (max(got) - since if got and not missed else None), missed


def listen(port: int = 0) -> socket.socket:
    """A listener that accepts and closes every connection (so its backlog
    never fills) until it is closed."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)

    def accept_all():
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return  # closed
            conn.close()

    threading.Thread(target=accept_all, daemon=True).start()
    return s


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; with fewer than 100 samples, p99 is the max."""
    if not values:
        return None
    v = sorted(values)
    return v[max(0, math.ceil(q / 100 * len(v)) - 1)]


# --------------------------------------------------------------------------


def kill_each(args, obs: Observers, members: dict, killed: list[str],
              procs: fp.Processes, label: str) -> tuple[list[float], int, list[str]]:
    """Kills each of `killed` in turn with SIGKILL and times until every
    remaining member reported it failed: (times, reports missing, the
    members left alive)."""
    detect, det_missed = [], 0
    alive = dict(members)
    for name in killed:
        victim = alive.pop(name)
        start = time.time()
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.wait()
        procs.forget(victim)
        seen = wait_all(obs, list(alive), "failed", name, None, start, args.limit, procs)
        t, missed = spread(seen, start)
        det_missed += missed
        if t is not None:
            detect.append(t)
        fp.log(f"{label}: killed {name}: "
               + (f"every other member saw it failed after {t:.1f} s" if t is not None
                  else f"{missed} members did not see it failed within {args.limit} s"))
        time.sleep(args.pause)
    return detect, det_missed, list(alive)


def lossy_window(args, obs: Observers, alive: list[str], ns: fp.NetNs,
                 procs: fp.Processes, label: str) -> dict | None:
    """Drops `--loss` percent of the packets in the namespace for
    `--loss-seconds` and counts the failure reports about members that are
    alive all along: (reports, distinct members reported).  None without a
    namespace of our own (the host's packets are not ours to drop)."""
    if not ns.inside or args.loss <= 0 or args.loss_seconds <= 0:
        return None
    table = f"gossipbench{os.getpid()}"
    # Every packet on lo, TCP and UDP, both directions (a packet is received
    # once): serf's UDP probes and TCP push-pull, Trellis's QUIC datagrams.
    fp.run(["nft", "-f", "-"], input=(
        f"table inet {table} {{\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f"    numgen random mod 100 < {args.loss} drop\n"
        "  }\n"
        "}\n"))
    start = time.time()
    try:
        deadline = time.monotonic() + args.loss_seconds
        while time.monotonic() < deadline:
            procs.check_alive()
            obs.poll()
            time.sleep(0.5)
    finally:
        fp.run(["nft", "delete", "table", "inet", table])
    end = time.time()
    # Reports already on their way when the loss stopped are still its doing.
    time.sleep(2)
    obs.poll()
    live = set(alive)
    reports = [(who, m) for who, evs in obs.events.items() if who in live
               for ts, k, m, _ in evs if k == "failed" and m in live and start <= ts <= end + 2]
    out = {"reports": len(reports), "members": len({m for _, m in reports}),
           "seconds": end - start}
    fp.log(f"{label}: {args.loss}% loss for {out['seconds']:.0f} s: {out['reports']} failure "
           f"reports about {out['members']} live members")
    return out


def trellis_size(args, n: int, work: Path, ns: fp.NetNs, procs: fp.Processes) -> dict:
    rng = random.Random(n)
    names = [f"site-1-n{i:02d}" for i in range(1, n + 1)]
    order = rng.sample(names, args.changes + args.kills)
    changed, killed = order[:args.changes], order[args.changes:]
    # The changed nodes get a TCP check against a listener of this script's:
    # closing it fails the check, listening again passes it.  A TCP connect
    # costs the node far less CPU than running a program, so the check does
    # not weigh on the footprint figures.
    listeners = {name: listen() for name in changed}

    def check(name):
        if name not in listeners:
            return ""
        port = listeners[name].getsockname()[1]
        return ('[[checks]]\nname = "bench"\n'
                f'tcp = "127.0.0.1:{port}"\n'
                f'interval = "{args.check_interval}"\ntimeout = "{args.check_interval}"\n')

    a = argparse.Namespace(**vars(args))
    a.sites, a.nodes_per_site = 1, n
    a.warmup = warmup(args, n)
    tr = fp.run_trellis(a, work, ns, procs, node_extra=check, env_extra={
        "TRELLIS_LOG_FORMAT": "json",
        "TRELLIS_LOG": f"{args.trellis_log},trellis_node::gossip=debug,trellis_node::agent=info",
    })
    members = {m.name: m for m in tr["nodes"] + tr["relay_members"]}
    obs = Observers({name: m.log for name, m in members.items()}, trellis_events)

    prop, prop_missed = [], 0
    for name in changed:
        for status in ("critical", "passing"):
            start = time.time()
            if status == "critical":
                port = listeners[name].getsockname()[1]
                listeners[name].shutdown(socket.SHUT_RDWR)  # wakes accept()
                listeners[name].close()
            else:
                listeners[name] = listen(port)
            others = [m for m in members if m != name]
            origin = wait_all(obs, [name], "published", None, status, start, 30, procs)[name]
            if origin is None:
                raise fp.BenchError(f"{name} did not publish status {status} within 30 s")
            seen = wait_all(obs, others, "status", name, status, start, args.limit, procs)
            t, missed = spread(seen, origin)
            prop_missed += missed
            if t is not None:
                prop.append(t)
            fp.log(f"trellis N={n}: {name} -> {status}: "
                   + (f"every member saw it {t:.2f} s after it was published" if t is not None
                      else f"{missed} members never saw it"))
    detect, det_missed, alive = kill_each(args, obs, members, killed, procs, f"trellis N={n}")
    loss = lossy_window(args, obs, alive, ns, procs, f"trellis N={n}")
    tr.update(prop=prop, prop_missed=prop_missed, detect=detect, det_missed=det_missed,
              loss=loss)
    return tr


def warmup(args, n: int) -> int:
    """Seconds from convergence to the window at `n` members, both systems."""
    return args.warmup if args.warmup is not None else 15 + round(0.75 * n)


def serf_size(args, n: int, work: Path, ns: fp.NetNs, procs: fp.Processes) -> dict:
    events = work / "serf-events"
    events.mkdir()
    handler = work / "serf-handler.sh"
    handler.write_text(HANDLER)
    handler.chmod(0o755)
    # The handler is added only once the cluster has converged and the
    # footprint is measured (serf reloads event handlers on SIGHUP): with
    # 200 agents on 2 cores, the handlers run for the false failures of a
    # busy start fed on themselves and the cluster never converged.
    conf = work / "serf-handlers.json"
    conf.write_text("{}")
    a = argparse.Namespace(**vars(args))
    a.warmup = warmup(args, n)
    sf = fp.run_serf(a, work, ns, procs, n, extra_argv=[f"-config-file={conf}"],
                     env_extra={"GOSSIP_BENCH_EVENTS": str(events)})
    conf.write_text(json.dumps({"event_handlers": [f"member-failed,member-update={handler}"]}))
    for m in sf["agents"]:
        os.kill(m.pid, signal.SIGHUP)
    time.sleep(2)
    agents = {m.name.removeprefix("serf-"): m for m in sf["agents"]}
    obs = Observers({name: events / name for name in agents}, serf_events)
    rng = random.Random(n)
    names = sorted(agents)
    order = rng.sample(names, min(len(names), args.changes + args.kills))
    changed, killed = order[:args.changes], order[args.changes:]
    serf = shutil.which("serf")

    prop, prop_missed = [], 0
    for k, name in enumerate(changed):
        for turn in ("a", "b"):
            r = subprocess.run([serf, "tags", "-set", f"bench={k}{turn}",
                                f"-rpc-addr={agents[name].fields['rpc']}"],
                               capture_output=True, text=True, timeout=10)
            origin = time.time()
            if r.returncode != 0:
                raise fp.BenchError(f"serf tags on {name} failed: {r.stderr.strip()}")
            others = [m for m in agents if m != name]
            seen = wait_all(obs, others, "status", name, None, origin - 0.05, args.limit, procs)
            t, missed = spread(seen, origin)
            prop_missed += missed
            if t is not None:
                prop.append(max(t, 0.0))
            fp.log(f"serf N={n}: {name} tag bench={k}{turn}: "
                   + (f"every agent saw it after {t:.2f} s" if t is not None
                      else f"{missed} agents never saw it"))
            time.sleep(0.5)
    detect, det_missed, alive = kill_each(args, obs, agents, killed, procs, f"serf N={n}")
    loss = lossy_window(args, obs, alive, ns, procs, f"serf N={n}")
    sf.update(prop=prop, prop_missed=prop_missed, detect=detect, det_missed=det_missed,
              loss=loss)
    return sf


# --------------------------------------------------------------------------


def figures(res: dict, what: str) -> dict:
    w = res["window"]
    pids = res["members"]
    out = {
        "rss": statistics.fmean(fp.mib(w.rss_kib[p]) for p in pids),
        "cpu": statistics.fmean(w.cpu_pct[p] for p in pids),
        "wire": (w.tx_bytes / len(pids) / w.tx_seconds) if w.tx_bytes is not None else None,
        "payload": statistics.fmean(res["payload"]) if res["payload"] else None,
        "prop50": pct(res["prop"], 50), "prop99": pct(res["prop"], 99),
        "det50": pct(res["detect"], 50), "det99": pct(res["detect"], 99),
        "prop_n": len(res["prop"]), "det_n": len(res["detect"]),
        "missed": res["prop_missed"] + res["det_missed"],
        "false": res["loss"]["reports"] if res["loss"] else None,
        "false_members": res["loss"]["members"] if res["loss"] else None,
    }
    if what == "trellis":
        out["msgs"] = statistics.fmean(res["msgs"])
    return out


def table(n: int, t: dict, s: dict | None, args) -> str:
    rows = [
        ("RSS per member (MiB), mean", "rss", 1),
        ("CPU per member (% of one core), mean", "cpu", 2),
        ("bytes sent per member per s (wire, lo)", "wire", 0),
        ("gossip payload bytes per member per s", "payload", 0),
        (f"change seen by all (s), p50 of {t['prop_n']}", "prop50", 2),
        ("change seen by all (s), p99 (max)", "prop99", 2),
        (f"kill -9 seen failed by all (s), p50 of {t['det_n']}", "det50", 1),
        ("kill -9 seen failed by all (s), p99 (max)", "det99", 1),
        (f"false failure reports, {args.loss}% loss, {args.loss_seconds} s", "false", 0),
        ("  live members reported failed", "false_members", 0),
    ]
    w0, w1 = 46, 12
    head = f"N = {n} members"
    lines = [f"{head:<{w0}}{'trellis':>{w1}}{'serf':>{w1}}{'trellis/serf':>{w1 + 2}}"]
    for label, key, d in rows:
        a, b = t[key], (s[key] if s else None)
        lines.append(f"{label:<{w0}}{fp.fmt(a, d):>{w1}}{fp.fmt(b, d):>{w1}}"
                     f"{fp.ratio(a, b):>{w1 + 2}}")
    lines.append(f"{'members that never saw a change or a failure':<{w0}}"
                 f"{t['missed']:>{w1}}{(s['missed'] if s else 'n/a'):>{w1}}")
    lines.append(f"  trellis-node gossip messages sent per second, mean: {t['msgs']:.1f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Compare Trellis site gossip with HashiCorp Serf at several cluster "
        "sizes, in the same run on the same machine: per-member RSS, CPU and bytes; time "
        "for a changed value to reach every member; time for every member to see a "
        "kill -9'd member as failed.",
        epilog="Build first: cargo build --release --bins. Baseline: apt-get install serf. "
        "Run as root (network namespaces give the wire byte counts). "
        "Example, quicker: sudo python3 tests/bench/gossip.py --sizes 25 --kills 3 --changes 2",
    )
    p.add_argument("--sizes", default="25,50,100,200",
                   help="members per cluster, comma-separated (default 25,50,100,200)")
    p.add_argument("--kills", type=int, default=5,
                   help="members killed one after another per size (default 5)")
    p.add_argument("--changes", type=int, default=3,
                   help="members whose value is changed, twice each, per size (default 3)")
    p.add_argument("--seconds", type=int, default=30,
                   help="footprint window in seconds, a multiple of 10 (default 30)")
    p.add_argument("--warmup", type=int, default=None,
                   help="seconds to wait after convergence before measuring (default "
                        "15 + 0.75 s per member: a Trellis member exchanges with any one "
                        "peer about every N/6 s, and its first digest to each peer carries "
                        "full member ids; by then 99%% of those first exchanges are over)")
    p.add_argument("--limit", type=float, default=60,
                   help="seconds to wait for every member to see a change or failure "
                        "(default 60)")
    p.add_argument("--pause", type=float, default=3,
                   help="seconds between kills (default 3)")
    p.add_argument("--loss", type=int, default=5,
                   help="percent of packets dropped (nftables, inside the namespace) while "
                        "false failure reports are counted; 0 skips it (default 5)")
    p.add_argument("--loss-seconds", type=int, default=60,
                   help="seconds of packet loss after the kills (default 60)")
    p.add_argument("--check-interval", default="1s",
                   help="interval of the TCP check flipped on the Trellis nodes whose value "
                        "changes (default 1s); only those nodes have a check")
    p.add_argument("--no-baseline", action="store_true", help="skip serf")
    p.add_argument("--no-netns", action="store_true",
                   help="run on the host loopback (wire bytes become n/a)")
    p.add_argument("--target-dir", type=Path, default=fp.REPO / "target" / "release",
                   help="where the trellis binaries are (default target/release)")
    p.add_argument("--trellis-log", default="info",
                   help="TRELLIS_LOG base filter for the Trellis processes (default info)")
    p.add_argument("--start-timeout", type=float, default=60,
                   help="seconds to wait for each process to be ready (default 60)")
    p.add_argument("--converge-timeout", type=float, default=240,
                   help="seconds to wait for membership to converge (default 240)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        p.error("--sizes takes whole numbers separated by commas, e.g. 25,50")
    if not args.sizes or min(args.sizes) < args.kills + args.changes + 2:
        p.error("every size must exceed --kills + --changes + 1")
    args.seconds = math.ceil(max(args.seconds, 10) / fp.SERF_INTERVAL) * fp.SERF_INTERVAL
    args.target_dir = args.target_dir.resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [b for b in fp.BINARIES if not (args.target_dir / b).is_file()]
    if missing:
        print(f"error: {', '.join(missing)} not found in {args.target_dir}: "
              "run cargo build --release --bins", file=sys.stderr)
        return 2
    stale = fp.stale_binaries(args.target_dir)
    if not args.no_baseline and shutil.which("serf") is None:
        print("error: serf not found: apt-get install serf (or --no-baseline)", file=sys.stderr)
        return 2
    use_netns = not args.no_netns
    if use_netns and (os.geteuid() != 0 or shutil.which("ip") is None):
        print("warning: no root or no iproute2: running on the host loopback; "
              "wire bytes will be n/a", file=sys.stderr)
        use_netns = False
    if use_netns and args.loss > 0 and shutil.which("nft") is None:
        print("error: nft not found: apt-get install nftables (or --loss 0)", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, fp._on_signal)

    info = fp.machine()
    load_before = os.getloadavg()[0]
    revision = fp.trellis_revision()
    work = Path(tempfile.mkdtemp(prefix="trellis-gossip-"))
    procs = fp.Processes()
    namespaces: list[fp.NetNs] = []
    tables, ok = [], False
    failures: dict[int, str] = {}
    try:
        for n in args.sizes:
            for system in ("trellis", "serf"):
                if system == "serf" and args.no_baseline:
                    continue
                d = work / f"{system}-{n}"
                d.mkdir()
                ns = fp.NetNs(f"tg{os.getpid()}-{system[0]}{n}", use_netns)
                namespaces.append(ns)
                ns.enter()
                try:
                    if system == "trellis":
                        t = figures(trellis_size(args, n, d, ns, procs), "trellis")
                    else:
                        try:
                            s = figures(serf_size(args, n, d, ns, procs), "serf")
                        except fp.BenchError as e:
                            # Report Trellis's figures even so, and why serf has none.
                            fp.log(f"serf N={n}: {e}")
                            s, failures[n] = None, str(e).splitlines()[0]
                finally:
                    procs.kill_all()
                    ns.delete()
            tables.append(table(n, t, None if args.no_baseline else s, args))
            if n in failures:
                tables[-1] += f"\n  serf: no figures: {failures[n]}"
            print(tables[-1], flush=True)
        print()
        print(f"date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
              f"machine: {info['cpus']} CPUs ({info['model']}), {info['mem_gib']} GiB RAM, "
              f"Linux {info['kernel']}; load average before: {load_before:.2f}")
        print(f"trellis {revision} "
              f"({'BINARIES OLDER THAN SOURCES' if stale else 'release build'}); "
              f"{'no baseline' if args.no_baseline else 'serf ' + fp.serf_version()}; "
              f"Trellis: 1 site of N nodes + its relay + 1 hub; serf: N agents; "
              f"window {args.seconds} s after "
              f"{', '.join(str(warmup(args, n)) for n in args.sizes)} s warm-up")
        print()
        print("\n\n".join(tables))
        print()
        print("change: Trellis from the origin's 'published' log line to each member's "
              "'seen changed' line; serf from `serf tags -set` returning to each agent's "
              "member-update event.")
        print("kill -9: from the kill to the last other member's failure report "
              "(Trellis log line 'site member is unreachable'; serf member-failed event).")
        print(f"false failure reports: after the kills, {args.loss}% of all packets on the "
              "namespace's loopback are dropped by nftables for the window; every failure "
              "report about a member that stayed alive counts (one per reporting member).")
        ok = True
        return 0
    except fp.BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, fp.Interrupted):
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        procs.kill_all()
        for ns in namespaces:
            ns.delete()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"working directory (logs): {work}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
