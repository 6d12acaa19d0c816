"""Turns bench/results.csv + bench/meta.json into bench/summary.csv, PNG charts
and BENCHMARKS.md. Standard library only; charts need matplotlib (skipped,
with a note, when it is missing). Rerun alone with `tools/bench --report-only`.

A section of an existing BENCHMARKS.md between `<!-- notes -->` and
`<!-- /notes -->` is kept when the file is regenerated.
"""
import csv
import json
import os
import re
import statistics

TARGETS = ["plain", "direct", "pgbouncer", "nextgres"]
# Column titles. "plain" is the twin server without nextgres loaded.
NAMES = {"plain": "direct, no nextgres", "direct": "direct", "pgbouncer": "PgBouncer", "nextgres": "nextgres"}
# A pooler's heap keeps what the first round's idle clients needed and serves
# later rounds from it, so only the first idle test of a run measures growth.
FIRST_ROUND_ONLY = {"pooler_rss_per_idle_b", "pooler_anon_per_idle_b", "pooler_rss_before_kb", "pooler_rss_after_kb",
                    "pooler_anon_before_kb", "pooler_anon_after_kb"}
NOTES_BEGIN, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


def cargo_version(repo):
    try:
        with open(os.path.join(repo, "Cargo.toml")) as f:
            m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
            return m.group(1) if m else "?"
    except OSError:
        return "?"


def write_csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, path)


def num(v):
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return None


def med(rows, key):
    vals = [num(r.get(key)) for r in rows]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def total(rows, key):
    return sum(int(num(r.get(key)) or 0) for r in rows)


def fmt(v, digits=0, unit=""):
    if v is None:
        return "–"
    if digits == 0:
        return f"{v:,.0f}{unit}"
    return f"{v:,.{digits}f}{unit}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fr(v):
    return "–" if v is None else f"{v:.2f}×"


class Data:
    def __init__(self, out):
        self.out = out
        with open(os.path.join(out, "bench", "results.csv")) as f:
            self.rows = list(csv.DictReader(f))
        try:
            with open(os.path.join(out, "bench", "meta.json")) as f:
                self.meta = json.load(f)
        except OSError:
            self.meta = {}

    def sel(self, workload, target=None, protocol=None, clients=None):
        return [r for r in self.rows if r["workload"] == workload
                and (target is None or r["target"] == target)
                and (protocol is None or r.get("protocol") == protocol)
                and (clients is None or str(r.get("clients")) == str(clients))]

    def configs(self, workload):
        seen = []
        for r in self.rows:
            if r["workload"] == workload:
                k = (r.get("protocol"), int(num(r.get("clients")) or 0))
                if k not in seen:
                    seen.append(k)
        return seen

    def m(self, workload, target, key, protocol=None, clients=None):
        rs = self.sel(workload, target, protocol, clients)
        if key in FIRST_ROUND_ONLY and rs:
            first = min(int(num(r["round"]) or 0) for r in rs)
            rs = [r for r in rs if int(num(r["round"]) or 0) == first]
        return med(rs, key)

    def per_tx_us(self, workload, target, key, protocol=None, clients=None):
        rs = self.sel(workload, target, protocol, clients)
        vals = [1e6 * num(r[key]) / num(r["tx"]) for r in rs
                if num(r.get(key)) is not None and num(r.get("tx"))]
        return statistics.median(vals) if vals else None

    def failures(self, workload, target, protocol=None, clients=None):
        rs = self.sel(workload, target, protocol, clients)
        return total(rs, "aborted_clients"), total(rs, "failed_tx"), sum(1 for r in rs if str(r.get("rc")) not in ("0", "")), len(rs)


def summary_rows(d):
    out = []
    for w in ("select", "rate", "tpcb", "idle", "storm", "bulk", "tls_select", "tls_bulk", "tls_idle"):
        for protocol, clients in d.configs(w):
            for t in TARGETS:
                rs = d.sel(w, t, protocol, clients)
                if not rs:
                    continue
                row = {"workload": w, "protocol": protocol, "clients": clients, "target": t, "runs": len(rs)}
                for k in ("tps", "p50_ms", "p99_ms", "lat_avg_ms", "conn_ms", "conn_avg_ms", "pooler_cpu_s", "pooler_cpu_pct",
                          "server_cpu_s", "client_cpu_s", "machine_busy_s", "elapsed_s", "idle_clients", "idle_ok",
                          "idle_failed", "idle_conn_per_s", "pooler_rss_per_idle_b", "pooler_anon_per_idle_b",
                          "server_anon_per_idle_b", "server_procs", "server_backends", "server_fixed", "bulk_bytes",
                          "mb_per_s", "ng_handoffs", "ng_waits", "ng_ahead", "pooler_us_per_conn", "rate_tps",
                          "p99_later_ms"):
                    v = d.m(w, t, k, protocol, clients)
                    if v is not None:
                        row[k] = round(v, 4)
                row["aborted_clients_total"] = total(rs, "aborted_clients")
                row["failed_tx_total"] = total(rs, "failed_tx")
                row["nonzero_exit_runs"] = sum(1 for r in rs if str(r.get("rc")) not in ("0", ""))
                for k in ("server_cpu_s", "pooler_cpu_s", "client_cpu_s", "machine_busy_s"):
                    v = d.per_tx_us(w, t, k, protocol, clients)
                    if v is not None:
                        row[k.replace("_cpu_s", "").replace("_s", "") + "_us_per_tx"] = round(v, 1)
                out.append(row)
    return out


def charts(d, bench_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no charts (tools/bench installs it into a venv)."
    colors = {"plain": "#aaaaaa", "direct": "#555555", "pgbouncer": "#1f77b4", "nextgres": "#d62728"}
    made = []
    protocols = [p for p in ("simple", "extended", "prepared") if d.sel("select", protocol=p)]
    for key, label, fname in (("tps", "transactions/s (median)", "select_tps.png"),
                              ("p99_ms", "p99 latency, ms (median)", "select_p99.png")):
        if not protocols:
            break
        fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 4), squeeze=False)
        for ax, p in zip(axes[0], protocols):
            for t in TARGETS:
                xs, ys = [], []
                for _, c in [k for k in d.configs("select") if k[0] == p]:
                    v = d.m("select", t, key, p, c)
                    if v is not None:
                        xs.append(c)
                        ys.append(v)
                if xs:
                    ax.plot(xs, ys, marker="o", label=t, color=colors[t])
                    bad = [(x, y) for x, y in zip(xs, ys) if d.failures("select", t, p, x)[0]]
                    if bad:
                        ax.scatter([b[0] for b in bad], [b[1] for b in bad], marker="X", s=140, color=colors[t],
                                   edgecolors="black", zorder=5, label=f"{t}: clients aborted")
            ax.set_xscale("log")
            if key == "p99_ms":
                ax.set_yscale("log")
            ax.set_title(f"pgbench -S -M {p}")
            ax.set_xlabel("clients")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"select-only, pool size {d.meta.get('pool_size', '?')}, "
                     f"{d.meta.get('nproc', '?')} cores shared by server, pooler and pgbench")
        fig.tight_layout()
        fig.savefig(os.path.join(bench_dir, fname), dpi=90)
        plt.close(fig)
        made.append(fname)
    # CPU per transaction, select-only simple: where the time goes
    cs = [c for p, c in d.configs("select") if p == "simple"]
    if cs:
        fig, ax = plt.subplots(figsize=(9, 4))
        ts = [t for t in TARGETS if d.sel("select", t)]
        width = 0.8 / max(len(ts), 1)
        for i, t in enumerate(ts):
            base = [0.0] * len(cs)
            for part, hatch, key in (("server", "", "server_cpu_s"), ("pooler", "//", "pooler_cpu_s"),
                                     ("pgbench", "..", "client_cpu_s")):
                vals = [d.per_tx_us("select", t, key, "simple", c) or 0.0 for c in cs]
                xs = [j + (i - (len(ts) - 1) / 2) * width for j in range(len(cs))]
                ax.bar(xs, vals, width, bottom=base, color=colors[t], hatch=hatch, edgecolor="white",
                       label=f"{t}: {part}" if any(vals) else None)
                base = [b + v for b, v in zip(base, vals)]
        ax.set_xticks(range(len(cs)))
        ax.set_xticklabels([f"{c} clients" for c in cs])
        ax.set_ylabel("CPU µs per transaction (median)")
        ax.set_title("select-only -M simple: CPU per transaction (server processes, pooler, pgbench)")
        ax.legend(fontsize=7, ncol=3)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(bench_dir, "select_cpu_per_tx.png"), dpi=90)
        plt.close(fig)
        made.append("select_cpu_per_tx.png")
    return made, ""


def equal_rate_note(d, p, c):
    """The rate workload's p99s for a saturated p99 that missed: the same
    offered load on both poolers, so the load generator's own closed-loop
    cycle (see bench.py's w_rate) does not decide the tail."""
    ng, pb = d.m("rate", "nextgres", "p99_ms", p, c), d.m("rate", "pgbouncer", "p99_ms", p, c)
    rate = d.m("rate", "nextgres", "rate_tps", p, c)
    if ng is None or pb is None or rate is None:
        return ""
    return (f"at an equal offered rate ({fmt(rate)} tps, `pgbench -R`) p99 {fmt(ng, 2)} vs {fmt(pb, 2)} ms "
            f"({'below' if ng <= pb else 'above'} PgBouncer's)")


def unread_note(d, p, c):
    """For a saturated p99 that missed: where the clients' requests waited
    (bench.py's tcp_unread samples), nextgres against PgBouncer."""
    ng, pb = d.m("select", "nextgres", "pgbench_unread", p, c), d.m("select", "pgbouncer", "pgbench_unread", p, c)
    if ng is None or pb is None:
        return ""
    return (f"the answers of {100 * ng / c:.0f}% of the clients waited unread in pgbench's sockets "
            f"(PgBouncer: {100 * pb / c:.0f}%): pgbench, not the pooler, held most requests (see Where the clients wait)")


def targets(d):
    """(target, measured, verdict, why) rows."""
    out = []
    pool = d.meta.get("pool_size", 16)
    nproc = d.meta.get("nproc") or 1

    def busy_pct(t, p, c):
        rs = d.sel("select", t, p, c)
        vals = [100 * num(r["machine_busy_s"]) / (num(r["elapsed_s"]) * nproc) for r in rs
                if num(r.get("machine_busy_s")) is not None and num(r.get("elapsed_s"))]
        return statistics.median(vals) if vals else None

    def cpu_why(p, c, other):
        bits = []
        ng_srv = d.per_tx_us("select", "nextgres", "server_cpu_s", p, c)
        ot_srv = d.per_tx_us("select", other, "server_cpu_s", p, c)
        ng_pool = d.per_tx_us("select", "nextgres", "pooler_cpu_s", p, c)
        ot_pool = d.per_tx_us("select", other, "pooler_cpu_s", p, c) if other == "pgbouncer" else None
        if ng_srv is not None and ot_srv is not None:
            bits.append(f"server CPU {ng_srv:.0f} µs/tx vs {ot_srv:.0f} µs/tx for {other}")
        if ng_pool is not None:
            bits.append(f"nextgres pooler {ng_pool:.0f} µs/tx" + (f" vs PgBouncer {ot_pool:.0f} µs/tx" if ot_pool is not None else ""))
        b = busy_pct("nextgres", p, c)
        if b is not None:
            bits.append(f"machine {b:.0f}% busy")
        return "; ".join(bits)

    for p in ("simple", "extended", "prepared"):
        for c in (100, 1000):
            if not d.sel("select", "nextgres", p, c):
                continue
            ng, pb = d.m("select", "nextgres", "tps", p, c), d.m("select", "pgbouncer", "tps", p, c)
            ng99, pb99 = d.m("select", "nextgres", "p99_ms", p, c), d.m("select", "pgbouncer", "p99_ms", p, c)
            r = ratio(ng, pb)
            ab_ng, _, _, _ = d.failures("select", "nextgres", p, c)
            ab_pb, _, _, _ = d.failures("select", "pgbouncer", p, c)
            measured = f"{fmt(ng)} vs {fmt(pb)} tps ({fr(r)}); p99 {fmt(ng99, 2)} vs {fmt(pb99, 2)} ms"
            if ab_ng or ab_pb:
                measured += f"; aborted clients: nextgres {ab_ng}, PgBouncer {ab_pb}"
            ok_tps = r is not None and r >= 1.5
            ok_p99 = ng99 is not None and pb99 is not None and ng99 <= pb99
            verdict = "met" if ok_tps and ok_p99 and not ab_ng else "missed"
            why = ""
            if ab_pb and not ab_ng and ng:
                verdict = "n/a"
                why = (f"not comparable, PgBouncer cannot run it: {ab_pb} of its clients aborted (prepared statements in "
                       "transaction mode), so its TPS and p99 count only the transactions before that; "
                       "nextgres ran it without errors")
            elif verdict == "missed":
                if ok_tps and not ok_p99:
                    why = "".join(n + "; " for n in (equal_rate_note(d, p, c), unread_note(d, p, c)) if n)
                if ab_ng:
                    why = ("named prepared statements do not follow clients across backends yet: "
                           f"{ab_ng} nextgres clients aborted (PgBouncer {d.meta.get('pgbouncer', '')[:15]} "
                           f"has no prepared-statement support in transaction mode either: {ab_pb} aborted)")
                else:
                    why += cpu_why(p, c, "pgbouncer")
            out.append((f"select-only {c} clients, -M {p}: nextgres ≥ 1.5× PgBouncer TPS and p99 ≤ PgBouncer",
                        measured, verdict, why))
    for p in ("simple", "extended", "prepared"):
        # saturated pool against the same work on a server without nextgres:
        # only the pooling costs differ
        if not (d.sel("select", "nextgres", p, 100) and d.sel("select", "plain", p, pool)):
            continue
        ng, pl = d.m("select", "nextgres", "tps", p, 100), d.m("select", "plain", "tps", p, pool)
        r = ratio(ng, pl)
        verdict = "met" if r is not None and r >= 0.85 and not d.failures("select", "nextgres", p, 100)[0] else "missed"
        out.append((f"select-only 100 clients over a pool of {pool}, -M {p}: nextgres ≥ 0.85× {pool} direct clients "
                    "on a server without nextgres",
                    f"{fmt(ng)} vs {fmt(pl)} tps ({fr(r)})", verdict,
                    "" if verdict == "met" else cpu_why(p, 100, "pgbouncer")))
    for p in ("simple", "extended", "prepared"):
        if not (d.sel("select", "nextgres", p, pool) and d.sel("select", "plain", p, pool)):
            continue
        ng, pl = d.m("select", "nextgres", "tps", p, pool), d.m("select", "plain", "tps", p, pool)
        r = ratio(ng, pl)
        verdict = "met" if r is not None and r >= 0.97 and not d.failures("select", "nextgres", p, pool)[0] else "missed"
        out.append((f"select-only {pool} clients, pool {pool}, -M {p}: nextgres ≥ 0.97× direct on a server without nextgres",
                    f"{fmt(ng)} vs {fmt(pl)} tps ({fr(r)}); same server, direct: {fmt(d.m('select', 'direct', 'tps', p, pool))}",
                    verdict, "" if verdict == "met" else cpu_why(p, pool, "plain")))
    for p in ("simple", "extended", "prepared"):
        us = d.per_tx_us("select", "nextgres", "pooler_cpu_s", p, 100)
        if us is None:
            continue
        pb = d.per_tx_us("select", "pgbouncer", "pooler_cpu_s", p, 100)
        verdict = "met" if us <= 2.0 else "missed"
        out.append((f"select-only 100 clients, -M {p}: nextgres pooler CPU ≤ 2 µs per transaction "
                    "(single-core ceiling ≥ 500,000 tx/s)",
                    f"{us:.1f} µs/tx, ceiling {fmt(1e6 / us if us else None)} tx/s; PgBouncer "
                    f"{fmt(pb, 1)} µs/tx, ceiling {fmt(1e6 / pb if pb else None)} tx/s", verdict,
                    "" if verdict == "met" else "the pooler still takes part in every transaction of a saturated pool"
                    " (client back to the pooler at each ReadyForQuery(I), SCM_RIGHTS to the next backend)"))
    for c in (100,):
        if not (d.sel("tpcb", "nextgres", "simple", c) and d.sel("tpcb", "pgbouncer", "simple", c)):
            continue
        ng, pb = d.m("tpcb", "nextgres", "tps", "simple", c), d.m("tpcb", "pgbouncer", "tps", "simple", c)
        r = ratio(ng, pb)
        verdict = "met" if r is not None and r >= 1.0 else "missed"
        out.append((f"tpcb-like {c} clients: nextgres ≥ PgBouncer", f"{fmt(ng)} vs {fmt(pb)} tps ({fr(r)})", verdict,
                    "" if verdict == "met" else
                    f"server CPU {fmt(d.per_tx_us('tpcb', 'nextgres', 'server_cpu_s', 'simple', c))} µs/tx vs "
                    f"{fmt(d.per_tx_us('tpcb', 'pgbouncer', 'server_cpu_s', 'simple', c))} µs/tx for pgbouncer; "
                    f"nextgres pooler {fmt(d.per_tx_us('tpcb', 'nextgres', 'pooler_cpu_s', 'simple', c), 1)} µs/tx"))
    for p in ("simple", "extended", "prepared"):
        if not d.sel("select", "nextgres", p, 16) or d.sel("select", "plain", p, 16):
            continue  # the plain-server target above replaces this one
        ng, di = d.m("select", "nextgres", "tps", p, 16), d.m("select", "direct", "tps", p, 16)
        r = ratio(ng, di)
        ab, _, _, _ = d.failures("select", "nextgres", p, 16)
        verdict = "met" if r is not None and r >= 0.95 and not ab else "missed"
        why = "" if verdict == "met" else (
            f"{ab} clients aborted (prepared statements across backends); " if ab else "") + cpu_why(p, 16, "direct")
        out.append((f"select-only 16 clients, pool {pool} (≥ 16), -M {p}: nextgres ≥ 0.95× direct",
                    f"{fmt(ng)} vs {fmt(di)} tps ({fr(r)})", verdict, why if verdict == "missed" else ""))
    for p in ("simple", "extended", "prepared"):
        if not d.sel("select", "nextgres", p, 1000):
            continue
        ng, di = d.m("select", "nextgres", "tps", p, 1000), d.m("select", "direct", "tps", p, 1000)
        r = ratio(ng, di)
        ab, _, _, _ = d.failures("select", "nextgres", p, 1000)
        verdict = "met" if r is not None and r >= 1.0 and not ab else "missed"
        why = "" if verdict == "met" else (
            f"{ab} clients aborted (prepared statements across backends); " if ab else "") + cpu_why(p, 1000, "direct")
        out.append((f"select-only 1,000 clients, -M {p}: nextgres ≥ direct",
                    f"{fmt(ng)} vs {fmt(di)} tps ({fr(r)})", verdict, why))
    if d.sel("idle", "nextgres"):
        per = d.m("idle", "nextgres", "pooler_rss_per_idle_b")
        anon = d.m("idle", "nextgres", "pooler_anon_per_idle_b")
        n = d.m("idle", "nextgres", "idle_ok")
        fails = total(d.sel("idle", "nextgres"), "idle_failed")
        verdict = "met" if per is not None and per <= 1536 and not fails else "missed"
        why = ""
        if verdict == "missed":
            why = (f"{fails} idle logins failed; " if fails else "") + (
                f"pooler RSS grows {fmt(per)} B per idle client (private heap {fmt(anon)} B)" if per is not None else "")
        out.append((f"{fmt(d.meta.get('idle'))} idle clients: nextgres pooler memory ≤ 1.5 KiB per idle client",
                    f"{fmt(per)} B/client VmRSS ({fmt(anon)} B RssAnon), {fmt(n)} idle clients held; "
                    f"PgBouncer {fmt(d.m('idle', 'pgbouncer', 'pooler_rss_per_idle_b'))} B/client", verdict, why))
        procs = d.m("idle", "nextgres", "server_procs")
        fixed = d.m("idle", "nextgres", "server_fixed")
        backends = d.m("idle", "nextgres", "server_backends")
        verdict = "met" if backends is not None and backends <= pool else "missed"
        out.append((f"{fmt(d.meta.get('idle'))} idle clients: server processes ≤ pool size + fixed workers",
                    f"{fmt(procs)} server processes = {fmt(backends)} backends + {fmt(fixed)} postmaster and "
                    f"fixed workers (pool size {pool}); direct with {fmt(d.m('idle', 'direct', 'idle_ok'))} idle: "
                    f"{fmt(d.m('idle', 'direct', 'server_procs'))}",
                    verdict, "" if verdict == "met" else "more backends than the pool size were running"))
    if d.sel("bulk", "nextgres"):
        ng, pb = d.m("bulk", "nextgres", "pooler_cpu_s"), d.m("bulk", "pgbouncer", "pooler_cpu_s")
        r = ratio(ng, pb)
        verdict = "met" if r is not None and r < 0.01 else "missed"
        out.append(("bulk COPY (~{:.0f} MB): nextgres pooler CPU < 1% of PgBouncer's".format(
                    (d.m("bulk", "nextgres", "bulk_bytes") or 0) / 1e6),
                    f"{fmt(ng * 1000 if ng is not None else None, 2)} ms vs {fmt(pb * 1000 if pb is not None else None, 1)} ms "
                    f"({'–' if r is None else f'{100 * r:.3f}%'})", verdict,
                    "" if verdict == "met" else "the pooler spent CPU while the backend streamed the COPY"))
    return out


def md_table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def failure_note(d, w, t, p, c):
    ab, ft, nz, n = d.failures(w, t, p, c)
    if not (ab or ft or nz):
        return ""
    bits = []
    if ab:
        bits.append(f"{ab} clients aborted")
    if ft:
        bits.append(f"{ft} failed tx")
    if nz:
        bits.append(f"{nz}/{n} runs exit≠0")
    return " ⚠ " + ", ".join(bits)


def build(out):
    d = Data(out)
    bench_dir = os.path.join(out, "bench")
    write_csv(os.path.join(bench_dir, "summary.csv"), summary_rows(d))
    pngs, chart_note = charts(d, bench_dir)
    m = d.meta
    L = []
    L.append("# nextgres benchmarks\n")
    L.append(f"Direct PostgreSQL vs PgBouncer vs nextgres on one machine, generated by `tools/bench` "
             f"({m.get('mode', '?')} run, {m.get('date', '?')}, {m.get('rounds', '?')} rounds, "
             f"{m.get('duration_s', '?')} s per pgbench run, wall time {fmt((m.get('wall_s') or 0) / 60, 1)} min). "
             "Every number is the median over the rounds; raw rows are in "
             "[bench/results.csv](bench/results.csv), medians in [bench/summary.csv](bench/summary.csv).\n")
    L.append("Rerun (as root on Debian 12; installs what is missing, builds and installs the release build, "
             "cleans up after itself):\n")
    L.append("```sh\ntools/bench           # full run, ~20 min: rewrites BENCHMARKS.md and bench/\n"
             "tools/bench --quick   # 1 round, 1 s runs, < 2 min: CI smoke test, writes under /var/tmp/nextgres-bench\n"
             "tools/bench --report-only   # rebuild this file and the charts from bench/results.csv\n```\n")
    other = [100 * num(r["other_cpu_s"]) / (num(r["elapsed_s"]) * (m.get("nproc") or 1)) for r in d.rows
             if r["workload"] in ("select", "tpcb") and num(r.get("other_cpu_s")) is not None and num(r.get("elapsed_s"))]
    if other:
        q = statistics.quantiles(other, n=10) if len(other) >= 10 else [min(other)] * 8 + [max(other)]
        L.append(f"Interference: during the pgbench runs, CPU outside the benchmark's own processes took a median "
                 f"{statistics.median(other):.0f}% of the machine (90th percentile {q[-1]:.0f}%). "
                 + ("That is high: other work shared the cores, so treat absolute numbers as noisy; the runs are "
                    "interleaved, so the ratios are fairer than the absolute TPS.\n"
                    if statistics.median(other) > 10 else "\n"))
    L.append("## Machine and versions\n")
    L.append(md_table(["", ""], [
        ("CPU", f"{m.get('cpu_model', '?')}, {m.get('nproc', '?')} cores (server, pooler and pgbench share them)"),
        ("memory", f"{m.get('mem_gib', '?')} GiB"),
        ("OS", f"{m.get('os', '?')}, kernel {m.get('kernel', '?')}"),
        ("PostgreSQL", m.get("postgres", "?")),
        ("pgbench", m.get("pgbench", "?")),
        ("PgBouncer", m.get("pgbouncer", "?")),
        ("nextgres", m.get("nextgres", "?")),
        ("load at start", f"loadavg {' '.join(m.get('loadavg_at_start', []))}; "
                          f"{m.get('other_pg_or_build_procs_at_start', '?')} other PostgreSQL/cargo processes running"),
    ]) + "\n")
    L.append("## Setup\n")
    if m.get("plain"):
        L.append("- **direct, no nextgres** (select-only and tpcb-like only) = a second cluster of the same build, "
                 "settings and data that does not load nextgres (`shared_preload_libraries` empty): the baseline "
                 "without whatever nextgres's hooks cost every backend. It runs beside the main cluster and is "
                 "interleaved with the other paths.")
    L.append(f"- One PostgreSQL {m.get('postgres', '?').split()[-1]} cluster serves all three paths at the same time: **direct** = the server's own "
             f"TCP port (one backend process per connection); **pgbouncer** = PgBouncer, transaction pooling, "
             f"`default_pool_size = {m.get('pool_size')}`, connecting to the server's Unix socket; **nextgres** = "
             f"the nextgres pooler on its side port (`nextgres.port`), `nextgres.pool_size = {m.get('pool_size')}`, "
             "transaction mode, pooled backends log in over the Unix socket.")
    L.append("- Clients connect over TCP to 127.0.0.1 as role `app` with scram-sha-256 (`host all all 127.0.0.1/32 "
             "scram-sha-256`; `local all all trust` for the pool logins and the admin connection). PgBouncer "
             "authenticates clients with `auth_type = scram-sha-256` and an `auth_file` holding the role's SCRAM "
             "secret copied from `pg_authid` (no plaintext password anywhere); nextgres reads `pg_authid` itself. "
             "`sslmode=disable` for every client.")
    L.append("- Runs are interleaved: each configuration runs against the three targets in turn, the order rotated "
             f"every round. pgbench always runs with `-j {m.get('pgbench_jobs', 2)}` (at most one thread per client).")
    L.append(f"- pgbench scale {m.get('scale')}; workloads: select-only (`-S`) with `-M simple/extended/prepared` at "
             f"{', '.join(str(c) for c in m.get('clients', []))} clients; tpcb-like at "
             f"{', '.join(str(c) for c in m.get('tpcb_clients', []))} clients; {fmt(m.get('idle'))} idle clients "
             f"(direct: {fmt(m.get('idle_direct'))}, all that `max_connections` allows) plus 16 active select-only "
             f"clients; connection storm (`pgbench -C -S`, {m.get('storm_clients')} clients, every transaction a new "
             f"scram-sha-256 login); bulk `COPY (SELECT g, repeat('x', 96) FROM generate_series(1, "
             f"{fmt(m.get('bulk_rows'))}) g) TO STDOUT` through psql.")
    L.append("- pgbench's `-T` clock also runs while its clients log in, and no transaction starts before all "
             "have: runs with 50 or more clients get 7 ms per client added to `-T` for the logins (1,000 clients: "
             "+7 s), so the measured window stays about as long as the others. TPS is pgbench's figure without the "
             "initial connection time.")
    L.append("- Latency percentiles come from pgbench's per-transaction log (`-l`), all transactions of the run. "
             "CPU: pooler = `se.sum_exec_runtime` of the nextgres pooler process (pid from `nextgres.status()`) "
             "or of the pgbouncer process; server = utime+stime of the postmaster and all its children, reaped ones "
             "included (less the nextgres pooler); pgbench = its rusage; machine = /proc/stat. Memory: VmRSS and "
             "RssAnon of the pooler process before and after the idle clients connected (kernel socket buffers are "
             "not in RSS). Server processes: the postmaster and its children, sampled in the middle of the "
             "16-client run; backends = processes whose title is a client connection.")
    L.append("- The idle clients are `tools/bench.d/idle_clients.py` (asyncio, startup packet and SCRAM by hand); "
             "before each idle test all `app` backends are terminated so each path starts from zero backends.\n")
    L.append("PostgreSQL settings (on top of initdb's defaults):\n")
    L.append("```\n" + "\n".join(f"{k} = {v}" for k, v in m.get("pg_settings", {}).items()) + "\n```\n")
    L.append("PgBouncer settings (`[databases] app = host=<socket dir> port=<port> dbname=app`):\n")
    L.append("```\n" + "\n".join(f"{k} = {v}" for k, v in m.get("bouncer_settings", {}).items()) + "\n```\n")

    L.append("## Targets\n")
    trows = targets(d)
    L.append(md_table(["target", "measured (median)", "", "why (where missed)"],
                      [(t, meas, {"met": "✅ met", "n/a": "⚪ n/a"}.get(v, "❌ missed"), why)
                       for t, meas, v, why in trows]) + "\n")

    L.append("## Select-only (pgbench -S)\n")
    rows = []
    ts = [t for t in TARGETS if d.sel("select", t)]
    plain = "plain" in ts
    for p, c in d.configs("select"):
        tp = {t: d.m("select", t, "tps", p, c) for t in ts}
        p50 = {t: d.m("select", t, "p50_ms", p, c) for t in ts}
        p99 = {t: d.m("select", t, "p99_ms", p, c) for t in ts}
        rows.append((p, c) + tuple(fmt(tp[t]) + failure_note(d, "select", t, p, c) for t in ts)
                    + (fr(ratio(tp["nextgres"], tp["pgbouncer"])), fr(ratio(tp["nextgres"], tp["direct"])))
                    + ((fr(ratio(tp["nextgres"], tp["plain"])),) if plain else ())
                    + tuple(f"{fmt(p50[t], 2)} / {fmt(p99[t], 2)}" for t in ts))
    L.append(md_table(["-M", "clients"] + [f"{NAMES[t]} tps" for t in ts] + ["ng/PgB", "ng/direct"]
                      + (["ng/no-nextgres"] if plain else []) + [f"{NAMES[t]} p50/p99 ms" for t in ts], rows) + "\n")
    L.append("⚠ marks runs with errors; TPS counts only the transactions that succeeded. pgbench aborts a client "
             "at its first error, so a run whose clients all aborted ends early.\n")
    errs = {}
    for r in d.rows:
        if r.get("first_error") and r["workload"] in ("select", "tpcb", "storm", "idle"):
            key = (r["target"], re.sub(r"client \d+", "client N", r["first_error"])[:160])
            errs[key] = errs.get(key, 0) + 1
    if errs:
        L.append("First error of the runs that had one:\n")
        L.append(md_table(["target", "error", "runs"], [(t, f"`{e}`", n) for (t, e), n in sorted(errs.items())]) + "\n")

    if d.configs("rate"):
        L.append("### Latency at an equal rate (select-only, pgbench -R)\n")
        L.append("A saturated run's latency is the closed loop's: each pgbench thread polls its sockets, then walks its "
                 "clients in order, so an answer that arrives during a walk waits for the next poll, and the faster a "
                 "server answers the more its tail is pgbench's. Here PgBouncer and nextgres get the same offered "
                 "load, half the slower one's TPS in the same round's select-only run (`-R`; latency counted from "
                 "each transaction's scheduled start, so falling behind shows).\n")
        L.append("The last columns leave out each client's first transaction: with `-M prepared` pgbench prepares "
                 "there with a blocking `PQprepare`, so at the start each thread makes one client's round trip at a "
                 "time and the first transactions of its later clients wait for all of those before them.\n")
        rows = []
        rts = [t for t in TARGETS if d.sel("rate", t)]
        for p, c in d.configs("rate"):
            rows.append((p, c, fmt(d.m("rate", "nextgres", "rate_tps", p, c)))
                        + tuple(fmt(d.m("rate", t, "tps", p, c)) + failure_note(d, "rate", t, p, c) for t in rts)
                        + tuple(f"{fmt(d.m('rate', t, 'p50_ms', p, c), 2)} / {fmt(d.m('rate', t, 'p99_ms', p, c), 2)}"
                                for t in rts)
                        + tuple(fmt(d.m("rate", t, "p99_later_ms", p, c), 2) for t in rts))
        L.append(md_table(["-M", "clients", "offered tps"] + [f"{NAMES[t]} tps" for t in rts]
                          + [f"{NAMES[t]} p50/p99 ms" for t in rts]
                          + [f"{NAMES[t]} p99 ms, from each client's 2nd" for t in rts], rows) + "\n")

    waits = [(p, c) for p, c in d.configs("select") if d.m("select", "nextgres", "pgbench_unread", p, c) is not None]
    if waits:
        L.append("### Where the clients wait (select-only)\n")
        L.append("Twice a second during each run with 100 clients or more (after the logins), the kernel's TCP tables "
                 "(`/proc/net/tcp`) tell how many clients had an answer waiting unread in pgbench's socket, that is "
                 "waiting for pgbench rather than for the server; the others' requests were at the server or pooler "
                 "(queued or being served). Median over the samples and rounds. Where pgbench holds most clients, the "
                 "run's latency is pgbench's: its two threads share the two cores with the pool's backends, and a "
                 "thread that always has answers to read is preempted like any busy process, so every answer that "
                 "came in meanwhile waits for its next time slice.\n")
        rows = []
        wts = [t for t in TARGETS if d.sel("select", t)]
        for p, c in waits:
            unread = [d.m("select", t, "pgbench_unread", p, c) for t in wts]
            rows.append((p, c) + tuple("–" if u is None else f"{100 * u / c:.0f}%" for u in unread)
                        + tuple(f"{fmt(d.m('select', t, 'p50_ms', p, c), 2)} / {fmt(d.m('select', t, 'p99_ms', p, c), 2)}"
                                for t in wts))
        L.append(md_table(["-M", "clients"] + [f"{NAMES[t]}: answers unread by pgbench" for t in wts]
                          + [f"{NAMES[t]} p50/p99 ms" for t in wts], rows) + "\n")

    L.append("### CPU per transaction (select-only)\n")
    L.append("Median CPU microseconds per successful transaction, by process group, and how busy the machine "
             f"was ({m.get('nproc', '?')} cores = 100%). With every core busy, the CPU a transaction costs decides TPS.\n")
    rows = []
    for p, c in d.configs("select"):
        for t in TARGETS:
            rs = d.sel("select", t, p, c)
            if not rs:
                continue
            busy = [100 * num(r["machine_busy_s"]) / (num(r["elapsed_s"]) * (m.get("nproc") or 1)) for r in rs
                    if num(r.get("machine_busy_s")) is not None and num(r.get("elapsed_s"))]
            h = d.m("select", t, "ng_handoffs", p, c)
            w = d.m("select", t, "ng_waits", p, c)
            a = d.m("select", t, "ng_ahead", p, c)
            other = [100 * num(r["other_cpu_s"]) / (num(r["elapsed_s"]) * (m.get("nproc") or 1)) for r in rs
                     if num(r.get("other_cpu_s")) is not None and num(r.get("elapsed_s"))]
            pus = d.per_tx_us("select", t, "pooler_cpu_s", p, c)
            rows.append((p, c, NAMES[t], fmt(d.per_tx_us("select", t, "server_cpu_s", p, c), 1),
                         fmt(pus, 1), fmt(1e6 / pus) if pus else "–",
                         fmt(d.per_tx_us("select", t, "client_cpu_s", p, c), 1),
                         fmt(d.per_tx_us("select", t, "machine_busy_s", p, c), 1),
                         fmt(d.m("select", t, "pooler_cpu_pct", p, c), 0, "%"),
                         fmt(statistics.median(busy) if busy else None, 0, "%"),
                         fmt(statistics.median(other) if other else None, 0, "%"),
                         "" if h is None else f"{fmt(h)} / {fmt(w)} / {fmt(a) if a is not None else '–'}"))
    L.append(md_table(["-M", "clients", "target", "server µs/tx", "pooler µs/tx", "pooler ceiling tx/s",
                       "pgbench µs/tx", "machine µs/tx", "pooler CPU", "machine busy", "other load",
                       "nextgres transactions / waits / ahead"], rows) + "\n")
    L.append("*pooler ceiling* = 10^6 / pooler µs per transaction: the transactions per second at which the "
             "pooler's single thread would fill one core, whatever the number of cores (what a 64-core server would "
             "hit). *pooler CPU* is the share of one core the pooler process used; *other load* is the machine's CPU "
             "not accounted to the server, the pooler or pgbench (other work on the machine, kernel threads); "
             "on a quiet machine it is a few %, more means that row was disturbed. The last column is from "
             "`nextgres.pools` over the run: the pool's transactions (every one, handed off or not: the csv's "
             "`ng_handoffs` is this count), those whose client waited for a backend (`waits`), and attaches "
             "ahead.\n")

    L.append("## tpcb-like (pgbench default script, -M simple)\n")
    rows = []
    ts = [t for t in TARGETS if d.sel("tpcb", t)]
    for p, c in d.configs("tpcb"):
        tp = {t: d.m("tpcb", t, "tps", p, c) for t in ts}
        rows.append((c,) + tuple(fmt(tp[t]) + failure_note(d, "tpcb", t, p, c) for t in ts)
                    + (fr(ratio(tp["nextgres"], tp["pgbouncer"])), fr(ratio(tp["nextgres"], tp["direct"])))
                    + tuple(f"{fmt(d.m('tpcb', t, 'p50_ms', p, c), 2)} / {fmt(d.m('tpcb', t, 'p99_ms', p, c), 2)}"
                            for t in ts))
    L.append(md_table(["clients"] + [f"{NAMES[t]} tps" for t in ts] + ["ng/PgB", "ng/direct"]
                      + [f"{NAMES[t]} p50/p99 ms" for t in ts], rows) + "\n")

    L.append("## Idle clients plus 16 active\n")
    rows = []
    for t in TARGETS:
        rs = d.sel("idle", t)
        if not rs:
            continue
        rows.append((t, fmt(d.m("idle", t, "idle_ok")) + (f" ({total(rs, 'idle_failed')} failed)" if total(rs, "idle_failed") else ""),
                     fmt(d.m("idle", t, "idle_conn_per_s")),
                     fmt(d.m("idle", t, "tps")) + failure_note(d, "idle", t, None, None),
                     f"{fmt(d.m('idle', t, 'p50_ms'), 2)} / {fmt(d.m('idle', t, 'p99_ms'), 2)}",
                     "–" if t == "direct" else f"{fmt(d.m('idle', t, 'pooler_rss_before_kb'))} → {fmt(d.m('idle', t, 'pooler_rss_after_kb'))}",
                     "–" if t == "direct" else fmt(d.m("idle", t, "pooler_rss_per_idle_b")),
                     "–" if t == "direct" else fmt(d.m("idle", t, "pooler_anon_per_idle_b")),
                     fmt(d.m("idle", t, "server_anon_per_idle_b")),
                     f"{fmt(d.m('idle', t, 'server_procs'))} ({fmt(d.m('idle', t, 'server_backends'))} backends)"))
    L.append(md_table(["target", "idle clients", "logins/s", "16-active tps", "p50/p99 ms", "pooler VmRSS kB before → after",
                       "pooler B/idle (VmRSS)", "pooler B/idle (RssAnon)", "server private B/idle", "server processes"],
                      rows) + "\n")
    L.append("Direct holds only as many idle connections as `max_connections` allows; its row shows what the same "
             "clients cost as backends. Pooler memory columns come from the first round only (the idle test runs "
             "first in a round, on a fresh pooler): later rounds reuse the heap the first one grew and show ~0.\n")

    L.append("## Connection storm (pgbench -C -S)\n")
    rows = []
    for t in TARGETS:
        if not d.sel("storm", t):
            continue
        rows.append((t, fmt(d.m("storm", t, "tps")) + failure_note(d, "storm", t, None, None),
                     fmt(d.m("storm", t, "conn_avg_ms"), 2),
                     fmt(d.per_tx_us("storm", t, "server_cpu_s"), 0),
                     fmt(d.m("storm", t, "pooler_us_per_conn"), 1),
                     fmt(d.per_tx_us("storm", t, "client_cpu_s"), 0)))
    L.append(md_table(["target", "connections/s (1 query each)", "avg connect ms", "server µs/conn",
                       "pooler µs/conn", "pgbench µs/conn"], rows) + "\n")

    L.append("## Bulk COPY TO STDOUT\n")
    rows = []
    for t in TARGETS:
        if not d.sel("bulk", t):
            continue
        pc = d.m("bulk", t, "pooler_cpu_s")
        rows.append((t, fmt((d.m("bulk", t, "bulk_bytes") or 0) / 1e6, 1), fmt(d.m("bulk", t, "elapsed_s"), 2),
                     fmt(d.m("bulk", t, "mb_per_s"), 0), "–" if t == "direct" else fmt(pc * 1000 if pc is not None else None, 2),
                     fmt(d.m("bulk", t, "server_cpu_s"), 2), fmt(d.m("bulk", t, "client_cpu_s"), 2)))
    L.append(md_table(["target", "MB", "seconds", "MB/s", "pooler CPU ms", "server CPU s", "psql CPU s"], rows) + "\n")

    if d.sel("tls_select") or d.sel("tls_bulk") or d.sel("tls_idle"):
        L.append("## TLS (sslmode=require)\n")
        L.append("The server runs with `ssl = on` and a self-signed RSA-2048 certificate made for the run; clients "
                 "connect with `sslmode=require` (encrypted, certificate not verified). Direct: the server's own "
                 "TLS (OpenSSL); PgBouncer: `client_tls_sslmode = allow` with the same certificate, plain Unix "
                 "socket to the server; nextgres: the pooler terminates TLS (rustls) and relays for the pooled "
                 "backends on its relay workers (threads that each carry many clients' relays; "
                 "no kernel TLS on this machine).\n")
        rows = []
        for p, c in d.configs("tls_select"):
            for t in TARGETS:
                if not d.sel("tls_select", t, p, c):
                    continue
                pus = d.per_tx_us("tls_select", t, "pooler_cpu_s", p, c)
                rows.append((c, NAMES[t], fmt(d.m("tls_select", t, "tps", p, c)) + failure_note(d, "tls_select", t, p, c),
                             fmt(d.m("tls_select", t, "p50_ms", p, c), 2) + " / " + fmt(d.m("tls_select", t, "p99_ms", p, c), 2),
                             fmt(d.per_tx_us("tls_select", t, "server_cpu_s", p, c), 1), fmt(pus, 1),
                             fmt(d.m("tls_select", t, "pooler_cpu_pct", p, c), 0, "%")))
        if rows:
            L.append("Select-only (`-S -M simple`):\n")
            L.append(md_table(["clients", "target", "tps", "p50/p99 ms", "server µs/tx", "pooler µs/tx", "pooler CPU"],
                              rows) + "\n")
        rows = []
        for t in TARGETS:
            if not d.sel("tls_bulk", t):
                continue
            mb = (d.m("tls_bulk", t, "bulk_bytes") or 0) / 1e6
            pc = d.m("tls_bulk", t, "pooler_cpu_s")
            rows.append((NAMES[t], fmt(mb, 1), fmt(d.m("tls_bulk", t, "mb_per_s"), 0),
                         "–" if pc is None else fmt(pc * 1000, 1),
                         "–" if pc is None or not mb else fmt(pc * 1000 / mb, 2),
                         fmt(d.m("tls_bulk", t, "server_cpu_s"), 2)))
        if rows:
            L.append("Bulk `COPY ... TO STDOUT` through psql:\n")
            L.append(md_table(["target", "MB", "MB/s", "pooler CPU ms", "pooler CPU ms per MB", "server CPU s"], rows)
                     + "\n")
        rows = []
        for t in TARGETS:
            rs = d.sel("tls_idle", t)
            if not rs:
                continue
            rows.append((NAMES[t], fmt(d.m("tls_idle", t, "idle_ok"))
                         + (f" ({total(rs, 'idle_failed')} failed)" if total(rs, "idle_failed") else ""),
                         fmt(d.m("tls_idle", t, "idle_conn_per_s")),
                         fmt(d.m("tls_idle", t, "tps")) + failure_note(d, "tls_idle", t, None, None),
                         "–" if t == "direct" else fmt(d.m("tls_idle", t, "pooler_rss_per_idle_b")),
                         "–" if t == "direct" else fmt(d.m("tls_idle", t, "pooler_anon_per_idle_b")),
                         fmt(d.m("tls_idle", t, "server_anon_per_idle_b"))))
        if rows:
            L.append("Idle TLS clients plus 16 active TLS clients (first round only" + (
                ", after the plain idle test of that round: a pooler's heap already holds what plain idle clients "
                "needed, so these columns are what TLS adds per client" if d.sel("idle") else "") + "):\n")
            L.append(md_table(["target", "idle TLS clients", "logins/s", "16-active tps", "pooler B/idle (VmRSS)",
                               "pooler B/idle (RssAnon)", "server private B/idle"], rows) + "\n")
    if d.sel("priority"):
        L.append("## Pool priority (nextgres only)\n")
        L.append("Two `pgbench -S` runs start together, each with its own role's pool, sharing the database's "
                 "`nextgres.max_db_connections` (saturated); `prio_hi` has `nextgres.pool_priority = 10`, `prio_lo` 0. "
                 "Waits for a backend are `nextgres.pools` counters (reset before each run), medians over rounds.\n")
        rows = []
        for p in ("high", "low"):
            rs = d.sel("priority", "nextgres", p)
            if not rs:
                continue
            rows.append((p, rs[0].get("clients"), rs[0].get("prio_limit"),
                         fmt(d.m("priority", "nextgres", "tps", p)) + failure_note(d, "priority", "nextgres", p, None),
                         fmt(d.m("priority", "nextgres", "ng_waits", p)),
                         fmt(d.m("priority", "nextgres", "ng_avg_wait_ms", p), 3),
                         fmt(d.m("priority", "nextgres", "ng_max_wait_ms", p), 2),
                         fmt(d.m("priority", "nextgres", "lat_avg_ms", p), 3)))
        L.append(md_table(["pool priority", "clients", "max_db_connections", "tps", "waits", "avg wait ms",
                           "max wait ms", "pgbench latency avg ms"], rows) + "\n")

    prof_path = os.path.join(bench_dir, "profile.json")
    if os.path.exists(prof_path):
        with open(prof_path) as f:
            profs = json.load(f)
        L.append("## Where the CPU goes (perf)\n")
        L.append(f"`perf record -a -e cpu-clock -F 999` over one extra select-only run per target "
                 f"({profs[0].get('clients', 100)} clients, `-M simple`, same duration). (No hardware counters in "
                 "this VM: cpu-clock samples skid to where interrupts are re-enabled, so kernel time shows up "
                 "largely as `_raw_spin_unlock_irqrestore`; wake-ups of other processes land there.) CPU µs per transaction by process group, from the samples "
                 "(server processes = postmaster children, the backends; the nextgres pooler is its own group):\n")
        groups = ["server processes", "nextgres pooler", "pgbouncer", "pgbench", "other"]
        rows = []
        for pr in profs:
            tx = pr.get("tx") or 0
            rows.append((pr["target"], fmt(pr.get("tps"))) + tuple(
                fmt(1e6 * pr["groups"].get(g, 0) / 999 / tx, 1) if tx and pr["groups"].get(g) else "–" for g in groups))
        L.append(md_table(["target", "tps"] + [f"{g} µs/tx" for g in groups], rows) + "\n")
        L.append("Server processes' CPU per transaction by object (kernel = system calls, scheduling, "
                 "networking on their behalf):\n")
        objs = ["postgres", "nextgres.so", "[kernel.kallsyms]", "libc.so.6"]
        rows = []
        for pr in profs:
            tx = pr.get("tx") or 0
            ds = pr.get("dso", {}).get("server processes", {})
            rest = sum(n for o, n in ds.items() if o not in objs)
            rows.append((pr["target"],) + tuple(fmt(1e6 * ds.get(o, 0) / 999 / tx, 1) if tx else "–" for o in objs)
                        + (fmt(1e6 * rest / 999 / tx, 1) if tx else "–",))
        L.append(md_table(["target", "postgres µs/tx", "nextgres.so µs/tx", "kernel µs/tx", "libc µs/tx",
                           "other objects µs/tx"], rows) + "\n")
        by = {pr["target"]: pr for pr in profs}

        def us_by_sym(pr, g):
            tx = pr.get("tx") or 0
            return {(sym, dso): 1e6 * c / 999 / tx for c, sym, dso in pr["top"].get(g, [])} if tx else {}
        if "nextgres" in by:
            ng = us_by_sym(by["nextgres"], "server processes")
            for base in ("direct", "pgbouncer"):
                if base not in by:
                    continue
                bs = us_by_sym(by[base], "server processes")
                diff = sorted(((v - bs.get(k, 0.0), k, v, bs.get(k, 0.0)) for k, v in ng.items()), reverse=True)[:12]
                L.append(f"Where nextgres' server processes spend more than {base}'s, per transaction (symbols "
                         f"among each side's 80 hottest):\n")
                L.append(md_table(["extra µs/tx", "symbol", "object", "nextgres µs/tx", f"{base} µs/tx"],
                                  [(f"{dv:+.1f}", f"`{sym}`", dso, f"{v:.1f}", f"{b:.1f}")
                                   for dv, (sym, dso), v, b in diff]) + "\n")
        for pr in profs:
            for g, n in (("server processes", 15), ("nextgres pooler", 10)):
                top = pr["top"].get(g)
                if not top or pr["groups"].get(g, 0) < 50 or (g == "server processes" and pr["target"] == "direct"):
                    continue
                tot = pr["groups"].get(g, 1)
                L.append(f"Top symbols, {g}, target {pr['target']} (% of the group's samples):\n")
                L.append(md_table(["%", "symbol", "object"],
                                  [(f"{100 * c / tot:.1f}", f"`{sym}`", dso) for c, sym, dso in top[:n]]) + "\n")
    L.append("## Charts\n")
    if pngs:
        L += [f"![{p}](bench/{p})\n" for p in pngs]
    else:
        L.append(chart_note + "\n")
    if m.get("server_log_summary") is not None:
        L.append("## Server log\n")
        L.append(f"The nextgres pooler was the same process from start to end: {m.get('pooler_alive_at_end')}. "
                 "Errors and warnings the server logged during the benchmark (before its shutdown; digits replaced "
                 "by N), by the `application_name` of the session (`bench-<target>`; `-` = none: the bench's own "
                 "admin session, pool logins, background processes). `terminating connection due to administrator "
                 "command` comes from the bench itself: it terminates the `app` backends before each idle test.\n")
        L.append(md_table(["lines", "target", "message"],
                          [(n, *(k.split("\t", 1) if "\t" in k else ("?", k))) for n, k in m["server_log_summary"]])
                 if m["server_log_summary"] else "none")
        L.append("")

    notes = ""
    path = os.path.join(out, "BENCHMARKS.md")
    try:
        with open(path) as f:
            old = f.read()
        i, j = old.find(NOTES_BEGIN), old.find(NOTES_END)
        if 0 <= i < j:
            notes = old[i:j + len(NOTES_END)]
    except OSError:
        pass
    L.append("## Observations\n")
    L.append(notes or f"{NOTES_BEGIN}\n(Hand-written notes go here; tools/bench keeps this section.)\n{NOTES_END}")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
