#!/usr/bin/env python3
"""Benchmark driver behind tools/bench: direct PostgreSQL vs PgBouncer vs nextgres.

One PostgreSQL 16 cluster with nextgres preloaded serves three paths at once:
  direct    the server's own TCP port (a backend per connection)
  pgbouncer PgBouncer (1.24 built from Debian's source package, or Debian 12's
            1.18) on its own port, transaction pooling, connecting to the
            server's Unix socket
  nextgres  the nextgres pooler on its side port (nextgres.port)
and a second cluster of the same build, without nextgres in
shared_preload_libraries, is the fourth:
  plain     direct connections to a server that does not load nextgres, the
            baseline without any cost of nextgres's hooks (select-only and
            tpcb-like workloads only)
When the server is built with OpenSSL, ssl = on (a self-signed certificate
made for the run) and the `tls` workload repeats select-only, bulk COPY and
idle clients with sslmode=require for direct, PgBouncer (client_tls_*) and
nextgres; every other workload uses sslmode=disable.
Workloads run interleaved (per configuration: each target in turn, the order
rotated every round), several rounds; report.py turns the raw rows into
medians, ratios, charts and BENCHMARKS.md.

Every child process has a deadline; the cluster and PgBouncer are stopped and
the data directory removed on every exit path.
"""
import argparse
import glob
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in the work tree
import report  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGETS = ["plain", "direct", "pgbouncer", "nextgres"]
# Workloads that also run against the plain cluster; the others compare the
# three paths of the nextgres cluster.
PLAIN_WORKLOADS = {"select", "tpcb"}
# The rate workload: these targets at RATE_SHARE of the slower one's
# saturated select-only TPS (at 0.8, run-to-run noise on a small machine
# left PgBouncer behind its schedule by seconds: a comparison of backlogs,
# not of latencies).
RATE_TARGETS = ("pgbouncer", "nextgres")
RATE_SHARE = 0.5
PASSWORD = "bench"
POOL_SIZE = 16
# pool_priority workload: each of two pools gets PRIO_CLIENTS clients, and
# their database's max_db_connections is PRIO_LIMIT (saturated).
PRIO_CLIENTS = 8
PRIO_LIMIT = 4


def log(*a):
    print("[bench]", *a, flush=True)


# --------------------------------------------------------------------------
# /proc accounting
# --------------------------------------------------------------------------

def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def proc_stat_fields(pid):
    """Fields of /proc/pid/stat after the command name (index 0 = state)."""
    s = read(f"/proc/{pid}/stat")
    if not s:
        return None
    return s[s.rindex(")") + 2:].split()


def sched_cpu_s(pid):
    """CPU seconds of all threads of pid, live or exited: the live threads'
    se.sum_exec_runtime (ns resolution), plus what exited threads used (the
    process's utime+stime less its live threads', clock ticks; the pooler's
    TLS handshake threads end once their clients are logged in, before the after-run snapshot)."""
    live, live_ticks = 0.0, 0.0
    for t in glob.glob(f"/proc/{pid}/task/*"):
        m = re.search(r"se\.sum_exec_runtime\s*:\s*([\d.]+)", read(t + "/sched"))
        tf = read(t + "/stat").rsplit(")", 1)[-1].split()
        if m and len(tf) > 12:
            live += float(m.group(1)) / 1000.0
            live_ticks += (int(tf[11]) + int(tf[12])) / CLK_TCK
    f = proc_stat_fields(pid)
    ticks = (int(f[11]) + int(f[12])) / CLK_TCK if f else 0.0
    if live == 0.0:  # kernels without sched debug: clock ticks only
        return ticks
    return live + max(0.0, ticks - live_ticks)


def children(ppid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        f = proc_stat_fields(d)
        if f and int(f[1]) == ppid:
            out.append(int(d))
    return out


def title(pid):
    return read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()


BACKEND_TITLE = re.compile(r"^postgres: \S+ \S+ (\[local\]|[0-9a-fA-F.:]+\(\d+\))")


def status_kb(pid):
    out = {}
    for line in read(f"/proc/{pid}/status").splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[k] = int(v.split()[0])
    return out


def machine_busy_s():
    f = [int(x) for x in read("/proc/stat").splitlines()[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / CLK_TCK


# --------------------------------------------------------------------------
# bounded child processes
# --------------------------------------------------------------------------

def run(cmd, timeout, check=True, as_pg=False, env=None, stdin=None, capture=True):
    if as_pg:
        cmd = ["runuser", "-u", "nextgres", "--"] + cmd
    r = subprocess.run(cmd, timeout=timeout, env=env, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                       stdout=subprocess.PIPE if capture else None,
                       stderr=subprocess.PIPE if capture else None, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {(r.stderr or '')[-2000:]}")
    return r


def wait_bounded(proc, deadline, at=None, sampler=None, every=None):
    """Waits for proc with os.wait4 (for its rusage); at the deadline sends
    SIGTERM, then SIGKILL 5 s later. Calls sampler() once at monotonic time
    `at` while the process runs, and every[2]() each every[1] s from
    monotonic time every[0] on while it runs (results are the callee's to
    keep). Returns (exit code, rusage, timed_out, sample)."""
    sampled, killed = None, False
    term_at = None
    next_tick = every[0] if every else None
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, ru, killed, sampled
        now = time.monotonic()
        if sampler and sampled is None and at is not None and now >= at:
            sampled = sampler()
        if next_tick is not None and now >= next_tick and term_at is None:
            every[2]()
            next_tick = now + every[1]
        if now > deadline and term_at is None:
            proc.send_signal(signal.SIGTERM)
            killed, term_at = True, now
        elif term_at is not None and now > term_at + 5:
            proc.send_signal(signal.SIGKILL)
            term_at = float("inf")
        time.sleep(0.02)


def tcp_unread(port):
    """Where a run's requests wait, from the kernel's TCP tables
    (/proc/net/tcp, tcp6: established sockets, rx_queue): (sockets whose
    peer is `port` and that hold bytes their process has not read, i.e.
    answers waiting for pgbench; sockets of `port` holding unread bytes,
    i.e. requests the server or pooler has not read yet; client sockets)."""
    client_unread = server_unread = clients = 0
    for fn in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(fn) as f:
                next(f)
                for line in f:
                    p = line.split()
                    if len(p) < 5 or p[3] != "01":  # TCP_ESTABLISHED
                        continue
                    local, remote = int(p[1].rsplit(":", 1)[1], 16), int(p[2].rsplit(":", 1)[1], 16)
                    unread = int(p[4].split(":")[1], 16) > 0
                    if remote == port:
                        clients += 1
                        client_unread += unread
                    elif local == port:
                        server_unread += unread
        except OSError:
            continue
    return client_unread, server_unread, clients


def percentile(sorted_vals, q):
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q * len(sorted_vals)) - 1))
    return sorted_vals[k]


# --------------------------------------------------------------------------
# the bench
# --------------------------------------------------------------------------

class Bench:
    def __init__(self, a):
        self.a = a
        self.repo = a.repo
        self.bindir = a.bindir
        self.work = a.work
        self.data = os.path.join(self.work, "data")
        self.plain_data = os.path.join(self.work, "plain-data")
        self.plain_pm_pid = None
        self.logs = os.path.join(self.work, "logs")
        self.pgb_dir = os.path.join(self.work, "pgbouncer")
        self.pm_pid = None
        self.pooler_pid = None
        self.bouncer_pid = None
        self.rows = []
        self.select_tps = {}  # (round, protocol, clients, target) -> tps, for the rate workload
        self.profiles = []
        self.csv_path = os.path.join(a.out, "bench", "results.csv")
        self.t_start = time.monotonic()

    # ---------------- helpers
    def pg(self, name):
        return os.path.join(self.bindir, name)

    def psql(self, sql, db="app", timeout=60, check=True):
        r = run([self.pg("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                 f"host={self.work} port={self.port} user=postgres dbname={db}", "-c", sql],
                timeout=timeout, check=check)
        return r.stdout.strip()

    def port_of(self, target):
        return {"direct": self.port, "pgbouncer": self.bouncer_port, "nextgres": self.ng_port,
                "plain": self.plain_port}[target]

    def conn_env(self, target, tls=False):
        port = self.port_of(target)
        env = dict(os.environ)
        for k in list(env):
            if k.startswith("PG"):
                del env[k]
        env.update(PGHOST="127.0.0.1", PGPORT=str(port), PGUSER="app", PGDATABASE="app",
                   PGPASSWORD=PASSWORD, PGSSLMODE="require" if tls else "disable", PGGSSENCMODE="disable", PGCONNECT_TIMEOUT="60",
                   PGAPPNAME=f"bench-{target}")
        return env

    def pooler_of(self, target):
        return {"direct": None, "plain": None, "pgbouncer": self.bouncer_pid, "nextgres": self.pooler_pid}[target]

    def pm_of(self, target):
        """The postmaster serving `target`."""
        return self.plain_pm_pid if target == "plain" else self.pm_pid

    def server_cpu_s(self, pm=None):
        """CPU of the postmaster and all its children, alive or reaped, less the nextgres pooler."""
        pm = pm or self.pm_pid
        f = proc_stat_fields(pm)
        total = sum(int(x) for x in f[11:15]) / CLK_TCK
        for c in children(pm):
            if c == self.pooler_pid:
                continue
            cf = proc_stat_fields(c)
            if cf:
                total += (int(cf[11]) + int(cf[12])) / CLK_TCK
        return total

    def server_procs(self, pm=None):
        """Server processes (postmaster + children), split into client backends and the rest."""
        kids = children(pm or self.pm_pid)
        backends = sum(1 for c in kids if BACKEND_TITLE.match(title(c)))
        return {"server_procs": 1 + len(kids), "server_backends": backends,
                "server_fixed": 1 + len(kids) - backends}

    def server_anon_kb(self):
        return sum(status_kb(c).get("RssAnon", 0) for c in children(self.pm_pid) if c != self.pooler_pid)

    def ng_pool_stats(self):
        out = self.psql("SELECT coalesce(sum(transactions),0), coalesce(sum(waits),0), coalesce(sum(wait_time_ms),0),"
                        " coalesce(sum(attaches_ahead),0)"
                        " FROM nextgres.pools WHERE database='app' AND role='app'", check=False)
        try:
            x, w, ms, ahead = (float(v) for v in out.split("|"))
            return x, w, ms, ahead
        except ValueError:
            return None

    def free_port(self, start, taken):
        p = start
        while p < start + 2000:
            if p not in taken:
                s = socket.socket()
                try:
                    s.bind(("127.0.0.1", p))
                    s.close()
                    return p
                except OSError:
                    s.close()
            p += 1
        raise RuntimeError("no free port")

    # ---------------- setup / teardown
    def setup(self):
        a = self.a
        try:
            os.unlink(os.path.join(a.out, "bench", "profile.json"))
        except FileNotFoundError:
            pass
        if os.path.exists(self.work):
            self.teardown(remove=True)
        os.makedirs(self.logs, exist_ok=True)
        for f in ("postgresql.log", "pgbouncer.log"):  # pg_ctl -l appends: start each run afresh
            try:
                os.unlink(os.path.join(self.logs, f))
            except FileNotFoundError:
                pass
        os.makedirs(self.pgb_dir, exist_ok=True)
        shutil.chown(self.work, "nextgres")
        shutil.chown(self.pgb_dir, "nextgres")
        shutil.chown(self.logs, "nextgres")
        self.port = self.free_port(a.base_port, set())
        self.ng_port = self.free_port(self.port + 1, {self.port})
        self.bouncer_port = self.free_port(self.ng_port + 1, {self.port, self.ng_port})
        self.plain_port = self.free_port(self.bouncer_port + 1, {self.port, self.ng_port, self.bouncer_port})
        log(f"ports: direct {self.port}, nextgres {self.ng_port}, pgbouncer {self.bouncer_port}, "
            f"plain {self.plain_port}; work dir {self.work}")

        run([self.pg("initdb"), "-D", self.data, "-U", "postgres", "--auth-local=trust",
             "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"], timeout=120, as_pg=True)
        self.tls = self.setup_tls()
        self.pg_settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.work}'",
            "max_connections": "1100",
            "shared_buffers": "256MB",
            "max_wal_size": "4GB",
            "checkpoint_timeout": "30min",
            "fsync": "on",
            "synchronous_commit": "on",
            "password_encryption": "'scram-sha-256'",
            "shared_preload_libraries": "'nextgres'",
            "nextgres.port": str(self.ng_port),
            "nextgres.pool_size": str(POOL_SIZE),
            "nextgres.pool_mode": "'transaction'",
            "nextgres.max_client_conn": "12000",
            "nextgres.query_wait_timeout": "120",
            # The defaults, spelled out so the report shows them.
            "nextgres.hold_idle_clients": "on",
            "nextgres.client_time_slice": os.environ.get("NEXTGRES_BENCH_TIME_SLICE", "'2ms'"),
            # The kernel queue (issue 15): on, the default, unless the
            # run asks for the handoff path.
            "nextgres.kernel_queue": os.environ.get("NEXTGRES_BENCH_KERNEL_QUEUE", "on"),
            "log_line_prefix": "'%m [%p] %a '",  # %a: bench-<target>, so errors can be told apart
        }
        if self.tls:
            self.pg_settings.update(ssl="on", ssl_cert_file=f"'{self.tls[0]}'", ssl_key_file=f"'{self.tls[1]}'")
        # --set: the run's own settings last, so they win (and the report's
        # settings block shows them).
        for name, value in a.settings:
            self.pg_settings[name] = value
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("\n# tools/bench\n")
            for k, v in self.pg_settings.items():
                f.write(f"{k} = {v}\n")
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as f:
            f.write("# tools/bench: pool logins (nextgres, PgBouncer) and admin use the Unix socket\n"
                    "local all all trust\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n")
        self.start_server()
        if self.plain_wanted():
            self.setup_plain()

        self.psql("CREATE ROLE app LOGIN PASSWORD 'bench'", db="postgres")
        self.psql("CREATE DATABASE app OWNER app", db="postgres")
        self.psql("CREATE EXTENSION nextgres")
        self.pooler_pid = int(self.psql("SELECT pooler_pid FROM nextgres.status()"))
        log(f"postmaster {self.pm_pid}, nextgres pooler {self.pooler_pid}")
        log(f"pgbench -i -s {a.scale}")
        run([self.pg("pgbench"), "-i", "-q", "-s", str(a.scale), f"host={self.work} port={self.port} user=app dbname=app"],
            timeout=900)
        self.psql("CHECKPOINT", db="postgres")
        self.start_bouncer()

    def setup_tls(self):
        """A self-signed certificate for the run when the server has OpenSSL
        (else None: the tls workload is skipped)."""
        conf = run([self.pg("pg_config"), "--configure"], timeout=30, check=False).stdout
        if "openssl" not in conf or not shutil.which("openssl"):
            log("the server is built without OpenSSL (or no openssl CLI): no TLS rows")
            return None
        d = os.path.join(self.work, "tls")
        os.makedirs(d, exist_ok=True)
        crt, key = os.path.join(d, "server.crt"), os.path.join(d, "server.key")
        run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
             "-keyout", key, "-out", crt], timeout=60)
        for f in (d, crt, key):
            shutil.chown(f, "nextgres")
        os.chmod(key, 0o600)
        return crt, key

    def plain_wanted(self):
        return bool(PLAIN_WORKLOADS & self.a.workloads)

    def setup_plain(self):
        """The baseline cluster: same build, settings and data, nextgres not loaded."""
        a = self.a
        run([self.pg("initdb"), "-D", self.plain_data, "-U", "postgres", "--auth-local=trust",
             "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"], timeout=120, as_pg=True)
        self.plain_settings = {k: v for k, v in self.pg_settings.items()
                               if k != "shared_preload_libraries" and not k.lower().startswith("nextgres.")}
        self.plain_settings["port"] = str(self.plain_port)
        with open(os.path.join(self.plain_data, "postgresql.conf"), "a") as f:
            f.write("\n# tools/bench: the baseline without nextgres\n")
            for k, v in self.plain_settings.items():
                f.write(f"{k} = {v}\n")
        shutil.copy(os.path.join(self.data, "pg_hba.conf"), os.path.join(self.plain_data, "pg_hba.conf"))
        shutil.chown(os.path.join(self.plain_data, "pg_hba.conf"), "nextgres")
        r = run(["bash", "-c", f"ulimit -n $(ulimit -Hn); exec '{self.pg('pg_ctl')}' -D '{self.plain_data}' "
                 f"-l '{self.logs}/plain.log' -w -t 90 start"], timeout=120, as_pg=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start (plain) failed: {r.stderr}\n{read(self.logs + '/plain.log')[-3000:]}")
        self.plain_pm_pid = int(read(os.path.join(self.plain_data, "postmaster.pid")).splitlines()[0])
        loaded = run([self.pg("psql"), "-X", "-At", f"host={self.work} port={self.plain_port} user=postgres dbname=postgres",
                      "-c", "SHOW shared_preload_libraries"], timeout=60).stdout.strip()
        if "nextgres" in loaded:
            raise RuntimeError("the plain cluster loads nextgres")
        dsn = f"host={self.work} port={self.plain_port} user=postgres dbname=postgres"
        for sql in ("CREATE ROLE app LOGIN PASSWORD 'bench'", "CREATE DATABASE app OWNER app"):
            run([self.pg("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql], timeout=60)
        log(f"plain postmaster {self.plain_pm_pid} (no nextgres); pgbench -i -s {a.scale}")
        run([self.pg("pgbench"), "-i", "-q", "-s", str(a.scale),
             f"host={self.work} port={self.plain_port} user=app dbname=app"], timeout=900)
        run([self.pg("psql"), "-X", "-q", dsn, "-c", "CHECKPOINT"], timeout=300)

    def start_server(self):
        r = run(["bash", "-c", f"ulimit -n $(ulimit -Hn); exec '{self.pg('pg_ctl')}' -D '{self.data}' "
                 f"-l '{self.logs}/postgresql.log' -w -t 90 start"], timeout=120, as_pg=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {r.stderr}\n{read(self.logs + '/postgresql.log')[-3000:]}")
        self.pm_pid = int(read(os.path.join(self.data, "postmaster.pid")).splitlines()[0])
        self.loaded_so_sha = self.a.so_sha  # what was on disk when the server started
        if self.a.so_path:
            cur = run(["sha256sum", self.a.so_path], timeout=30).stdout.split()[0]
            if cur != self.a.so_sha:
                raise RuntimeError(f"{self.a.so_path} changed between install and server start "
                                   "(a concurrent install?); rerun tools/bench")

    def bouncer_version(self):
        out = run(["pgbouncer", "--version"], timeout=30, check=False).stdout
        m = re.search(r"PgBouncer (\d+)\.(\d+)", out)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    def start_bouncer(self):
        secret = self.psql("SELECT rolpassword FROM pg_authid WHERE rolname='app'", db="postgres")
        assert secret.startswith("SCRAM-SHA-256$"), secret
        userlist = os.path.join(self.pgb_dir, "userlist.txt")
        with open(userlist, "w") as f:
            f.write(f'"app" "{secret}"\n')
        self.bouncer_settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.bouncer_port),
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": userlist,
            "pool_mode": "transaction",
            "default_pool_size": str(POOL_SIZE),
            "min_pool_size": "0",
            "reserve_pool_size": "0",
            "max_client_conn": "12000",
            "max_db_connections": "0",
            "query_wait_timeout": "120",
            "listen_backlog": "4096",
            **({"client_tls_sslmode": "allow", "client_tls_cert_file": self.tls[0],
                "client_tls_key_file": self.tls[1]} if self.tls else {}),
            "log_connections": "0",
            # 1.21+: prepared statements in transaction mode, so -M prepared
            # runs through PgBouncer too (ignored by older versions: left out)
            **({"max_prepared_statements": "200"} if self.bouncer_version() >= (1, 21) else {}),
            "log_disconnections": "0",
            "logfile": os.path.join(self.logs, "pgbouncer.log"),
            "pidfile": os.path.join(self.pgb_dir, "pgbouncer.pid"),
        }
        ini = os.path.join(self.pgb_dir, "pgbouncer.ini")
        with open(ini, "w") as f:
            f.write(f"[databases]\napp = host={self.work} port={self.port} dbname=app\n\n[pgbouncer]\n")
            for k, v in self.bouncer_settings.items():
                f.write(f"{k} = {v}\n")
        for p in (userlist, ini):
            shutil.chown(p, "nextgres")
            os.chmod(p, 0o600)
        run(["bash", "-c", f"ulimit -n $(ulimit -Hn); exec pgbouncer -d -q '{ini}'"], timeout=30, as_pg=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pidtxt = read(self.bouncer_settings["pidfile"]).strip()
            if pidtxt:
                try:
                    socket.create_connection(("127.0.0.1", self.bouncer_port), timeout=1).close()
                    self.bouncer_pid = int(pidtxt)
                    log(f"pgbouncer {self.bouncer_pid}")
                    return
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError("pgbouncer did not start: " + read(self.bouncer_settings["logfile"])[-2000:])

    def teardown(self, remove=True):
        pidfile = os.path.join(self.pgb_dir, "pgbouncer.pid")
        pid = read(pidfile).strip()
        if pid.isdigit() and "pgbouncer" in title(pid):
            os.kill(int(pid), signal.SIGTERM)
            for _ in range(100):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.1)
            else:
                os.kill(int(pid), signal.SIGKILL)
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            r = run([self.pg("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop"],
                    timeout=90, as_pg=True, check=False)
            if r.returncode != 0:
                run([self.pg("pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "-t", "30", "stop"],
                    timeout=60, as_pg=True, check=False)
        if os.path.exists(os.path.join(self.plain_data, "postmaster.pid")):
            r = run([self.pg("pg_ctl"), "-D", self.plain_data, "-m", "fast", "-w", "-t", "60", "stop"],
                    timeout=90, as_pg=True, check=False)
            if r.returncode != 0:
                run([self.pg("pg_ctl"), "-D", self.plain_data, "-m", "immediate", "-w", "-t", "30", "stop"],
                    timeout=60, as_pg=True, check=False)
        if remove:
            shutil.rmtree(self.data, ignore_errors=True)
            shutil.rmtree(self.plain_data, ignore_errors=True)

    # ---------------- measurement
    def snapshot(self, target, settle_to=None):
        t = time.monotonic()
        pm = self.pm_of(target)
        direct = target in ("direct", "plain")
        if settle_to is not None and direct:
            # the client has exited; give its backends a moment to exit and be
            # reaped, so their CPU lands in the postmaster's cutime
            deadline = t + 3
            while time.monotonic() < deadline and self.server_procs(pm)["server_backends"] > settle_to:
                time.sleep(0.02)
        s = {"t": t, "busy": machine_busy_s(), "server": self.server_cpu_s(pm),
             "backends": self.server_procs(pm)["server_backends"] if direct else None}
        pp = self.pooler_of(target)
        if pp:
            s["pooler"] = sched_cpu_s(pp)
        if target == "nextgres":
            s["ng"] = self.ng_pool_stats()
        return s

    def account(self, row, before, after, client_ru):
        el = after["t"] - before["t"]
        row["elapsed_s"] = round(el, 3)
        row["machine_busy_s"] = round(after["busy"] - before["busy"], 3)
        row["server_cpu_s"] = round(after["server"] - before["server"], 3)
        if "pooler" in before:
            row["pooler_cpu_s"] = round(after["pooler"] - before["pooler"], 4)
            row["pooler_cpu_pct"] = round(100 * row["pooler_cpu_s"] / el, 1) if el > 0 else None
        if client_ru is not None:
            row["client_cpu_s"] = round(client_ru.ru_utime + client_ru.ru_stime, 3)
        # CPU nobody of ours used: other work on the machine (interference)
        row["other_cpu_s"] = round(row["machine_busy_s"] - row["server_cpu_s"] - (row.get("pooler_cpu_s") or 0)
                                   - (row.get("client_cpu_s") or 0), 3)
        if before.get("ng") and after.get("ng"):
            row["ng_handoffs"] = int(after["ng"][0] - before["ng"][0])
            row["ng_waits"] = int(after["ng"][1] - before["ng"][1])
            row["ng_wait_ms"] = round(after["ng"][2] - before["ng"][2], 1)
            row["ng_ahead"] = int(after["ng"][3] - before["ng"][3])

    def login_allowance(self, clients):
        """Seconds added to pgbench's -T for `clients` logins. pgbench's -T
        clock runs while its clients log in, and no transaction starts before
        all have (scram-sha-256 costs pgbench ~6 ms of CPU per login): large
        client counts get time to connect so the measured window stays as
        long as asked. TPS excludes the connection time."""
        return 0 if clients < 50 else math.ceil(clients * self.a.login_s)

    def pgbench(self, target, args, duration, tag, want_log=True, sample_at=None, sampler=None, clients=0, tls=False):
        duration += self.login_allowance(clients)
        rundir = os.path.join(self.work, "run")
        shutil.rmtree(rundir, ignore_errors=True)
        os.makedirs(rundir)
        cmd = [self.pg("pgbench"), "-n", *args, "-T", str(duration)]
        if want_log:
            cmd += ["-l", "--log-prefix", os.path.join(rundir, "tx")]
        out, err = open(os.path.join(rundir, "out"), "w+"), open(os.path.join(rundir, "err"), "w+")
        before = self.snapshot(target)
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=self.conn_env(target, tls), cwd=rundir)
        t0 = time.monotonic()
        # Many clients, saturated: where their requests wait, twice a second
        # after the logins (answers unread in pgbench's sockets, or requests
        # unread at the server's end): the run's latency is wherever most
        # wait. Only where the report reads it: a look costs CPU (~30 ms at
        # 1,000 clients) during the measured run.
        queues = []
        every = None
        if tag == "select" and clients >= 100:
            port = self.port_of(target)
            every = (t0 + self.login_allowance(clients) + 0.5, 0.5, lambda: queues.append(tcp_unread(port)))
        rc, ru, timed_out, sampled = wait_bounded(
            proc, t0 + duration + self.a.grace, at=(t0 + sample_at) if sample_at is not None else None, sampler=sampler,
            every=every)
        after = self.snapshot(target, settle_to=before["backends"] if tag != "idle" else None)
        out.seek(0)
        err.seek(0)
        o, e = out.read(), err.read()
        out.close()
        err.close()
        row = {"target": target, "rc": rc, "timed_out": int(timed_out), "T_s": duration}
        self.account(row, before, after, ru)
        # Samples taken while every client was connected (a late login or the
        # end of the run shows fewer).
        full = [q for q in queues if q[2] >= clients]
        if full:
            row["pgbench_unread"] = statistics.median(q[0] for q in full)
            row["server_unread"] = statistics.median(q[1] for q in full)
            row["unread_samples"] = len(full)

        def grab(rx, cast=float):
            m = re.search(rx, o)
            return cast(m.group(1)) if m else None
        row["tps"] = grab(r"tps = ([\d.]+)")
        row["tx"] = grab(r"number of transactions actually processed: (\d+)", int)
        row["failed_tx"] = grab(r"number of failed transactions: (\d+)", int) or 0
        row["conn_ms"] = grab(r"initial connection time = ([\d.]+) ms")
        row["conn_avg_ms"] = grab(r"average connection time = ([\d.]+) ms")
        row["lat_avg_ms"] = grab(r"latency average = ([\d.]+) ms")
        if row["conn_ms"] is not None:
            row["window_s"] = round(row["elapsed_s"] - row["conn_ms"] / 1000, 2)
        row["aborted_clients"] = len(re.findall(r"client \d+ (?:script \d+ )?aborted", e))
        errs = [ln for ln in e.splitlines() if "aborted" in ln] + \
            [ln for ln in e.splitlines() if "error" in ln.lower() or "fatal" in ln.lower()]
        row["first_error"] = errs[0][:200] if errs else ""
        if rc != 0 and not errs:
            row["first_error"] = (e.strip().splitlines() or ["exit " + str(rc)])[-1][:200]
        if want_log:
            lat, later = [], []
            for fn in glob.glob(os.path.join(rundir, "tx.*")):
                with open(fn) as f:
                    for line in f:
                        # client_id transaction_no time ...
                        p = line.split(" ", 3)
                        if len(p) > 2 and p[2].isdigit():
                            lat.append(int(p[2]))
                            if p[1] != "1":  # numbered from 1
                                later.append(int(p[2]))
            lat.sort()
            later.sort()
            if lat:
                row["p50_ms"] = round(percentile(lat, 0.50) / 1000, 3)
                row["p99_ms"] = round(percentile(lat, 0.99) / 1000, 3)
                row["max_ms"] = round(lat[-1] / 1000, 3)
            if later:
                # Without each client's first transaction: with -M prepared
                # pgbench prepares there with a blocking PQprepare, so every
                # client's first round trip waits for those of the clients
                # before it in its thread (a start-up burst of the load
                # generator's, not a state of the server).
                row["p99_later_ms"] = round(percentile(later, 0.99) / 1000, 3)
        if sampled:
            row.update(sampled)
        shutil.rmtree(rundir, ignore_errors=True)
        return row

    def record(self, row):
        row["t_offset_s"] = round(time.monotonic() - self.t_start, 1)
        self.rows.append(row)
        report.write_csv(self.csv_path, self.rows)
        bits = [f"[r{row['round']}] {row['workload']:<6} {row.get('protocol', ''):<8} c={row.get('clients', '')!s:<5}"
                f" {row['target']:<9}"]
        if row.get("tps") is not None:
            bits.append(f"{row['tps']:>10.1f} tps")
        if row.get("p99_ms") is not None:
            bits.append(f"p50 {row['p50_ms']} ms p99 {row['p99_ms']} ms")
        if row.get("pooler_cpu_pct") is not None:
            bits.append(f"pooler {row['pooler_cpu_pct']}% cpu")
        for k in ("idle_ok", "pooler_rss_per_idle_b", "server_procs", "mb_per_s", "pooler_cpu_s"):
            if row.get(k) is not None and row["workload"] in ("idle", "bulk"):
                bits.append(f"{k}={row[k]}")
        if row.get("aborted_clients") or row.get("failed_tx") or row.get("rc"):
            bits.append(f"!! rc={row.get('rc')} aborted={row.get('aborted_clients')} failed={row.get('failed_tx')}"
                        f" {row.get('first_error', '')[:100]}")
        log(" ".join(bits))

    def jobs(self, clients):
        """pgbench's -j for a run of `clients`: --jobs threads, at most one per client."""
        return ["-j", str(min(self.a.jobs, clients))]

    # ---------------- workloads
    def w_select(self, rnd, target, protocol, clients):
        row = self.pgbench(target, ["-S", "-M", protocol, "-c", str(clients), *self.jobs(clients)],
                           self.a.duration, "select", clients=clients)
        row.update(round=rnd, workload="select", protocol=protocol, clients=clients)
        self.record(row)
        self.select_tps[(rnd, protocol, clients, target)] = row.get("tps")

    def w_rate(self, rnd, target, protocol, clients, rate):
        """Select-only at a fixed offered rate (pgbench -R, transactions/s):
        PgBouncer and nextgres answer the same schedule, so their latencies
        compare servers rather than the load generator. A saturated run's p99
        is the closed loop's: the faster server's answers wait in pgbench's
        poll-then-walk cycle. pgbench's logged latency counts from each
        transaction's scheduled start, so a server that falls behind shows."""
        row = self.pgbench(target, ["-S", "-M", protocol, "-c", str(clients), *self.jobs(clients),
                                    "-R", str(rate)], self.a.duration, "rate", clients=clients)
        row.update(round=rnd, workload="rate", protocol=protocol, clients=clients, rate_tps=rate)
        self.record(row)

    def w_tls_select(self, rnd, target, clients):
        row = self.pgbench(target, ["-S", "-M", "simple", "-c", str(clients), *self.jobs(clients)],
                           self.a.duration, "tls_select", clients=clients, tls=True)
        row.update(round=rnd, workload="tls_select", protocol="simple", clients=clients)
        self.record(row)

    def w_tpcb(self, rnd, target, clients):
        row = self.pgbench(target, ["-M", "simple", "-c", str(clients), *self.jobs(clients)],
                           self.a.duration, "tpcb", clients=clients)
        row.update(round=rnd, workload="tpcb", protocol="simple", clients=clients)
        self.record(row)

    def w_storm(self, rnd, target):
        c = self.a.storm_clients
        row = self.pgbench(target, ["-C", "-S", "-M", "simple", "-c", str(c), *self.jobs(c)],
                           self.a.duration, "storm", want_log=False)
        row.update(round=rnd, workload="storm", protocol="simple", clients=c)
        if row.get("tps") and row.get("pooler_cpu_s") is not None and row.get("tx"):
            row["pooler_us_per_conn"] = round(1e6 * row["pooler_cpu_s"] / row["tx"], 1)
        self.record(row)

    def terminate_app_backends(self):
        # The priority workload's pools too (prio_hi, prio_lo): left from an
        # earlier round, their backends counted as this test's.
        self.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                  "WHERE usename IN ('app', 'prio_hi', 'prio_lo') AND pid <> pg_backend_pid()", db="postgres")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.server_procs()["server_backends"] == 0:
                break
            time.sleep(0.1)

    def w_idle(self, rnd, target, tls=False):
        n = self.a.idle if target != "direct" else min(self.a.idle, self.a.idle_direct)
        self.terminate_app_backends()
        time.sleep(0.5)
        pooler = self.pooler_of(target)
        row = {"round": rnd, "workload": "tls_idle" if tls else "idle", "protocol": "simple", "clients": 16,
               "target": target, "idle_clients": n}
        before_mem = status_kb(pooler) if pooler else {}
        before_anon = self.server_anon_kb()
        procs_before = self.server_procs()
        env = self.conn_env(target, tls)
        cmd = [sys.executable, os.path.join(HERE, "idle_clients.py"), "--host", "127.0.0.1", "--port", env["PGPORT"],
               "--user", "app", "--dbname", "app", "-n", str(n), "--hold-timeout", str(self.a.duration + 600)]
        if tls:
            # 64 TLS handshakes in flight at most: under nextgres.max_tls_handshakes
            # (100), which answers more with 53300 as a flood guard
            cmd += ["--tls", "--parallel", "64"]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, text=True)
        try:
            line = ""
            deadline = time.monotonic() + self.a.idle_connect_timeout
            while time.monotonic() < deadline and not line.startswith("READY"):
                r, _, _ = select.select([proc.stdout], [], [], 1)
                if r:
                    line = proc.stdout.readline()
                    if not line:
                        break
            m = re.match(r"READY ok=(\d+) failed=(\d+) seconds=([\d.]+) first_error=(.*)", line.strip())
            if not m:
                raise RuntimeError(f"idle clients did not get ready: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}")
            row["idle_ok"], row["idle_failed"] = int(m.group(1)), int(m.group(2))
            row["idle_connect_s"] = float(m.group(3))
            row["idle_conn_per_s"] = round(row["idle_ok"] / max(row["idle_connect_s"], 1e-6), 1)
            if m.group(4):
                row["first_error"] = m.group(4)[:200]
            time.sleep(1.0)
            if tls and target == "nextgres":
                # nextgres parks a TLS client idle for two janitor ticks (1 s
                # each): no relay, no socketpair. Measured once none is
                # left on a relay (60 s at most), as a pooler
                # holding idle TLS clients for long is.
                wait_until = time.monotonic() + 60
                while time.monotonic() < wait_until:
                    left = self.psql("SELECT count(*) FROM nextgres.clients WHERE tls_relay = 'thread'",
                                     check=False)
                    if left == "0":
                        break
                    time.sleep(0.5)
                row["tls_unparked_at_measure"] = int(left) if left.isdigit() else None
            if pooler:
                after_mem = status_kb(pooler)
                row["pooler_rss_before_kb"] = before_mem.get("VmRSS")
                row["pooler_rss_after_kb"] = after_mem.get("VmRSS")
                row["pooler_anon_before_kb"] = before_mem.get("RssAnon")
                row["pooler_anon_after_kb"] = after_mem.get("RssAnon")
                if row["idle_ok"]:
                    row["pooler_rss_per_idle_b"] = round(
                        1024 * (after_mem["VmRSS"] - before_mem["VmRSS"]) / row["idle_ok"], 1)
                    row["pooler_anon_per_idle_b"] = round(
                        1024 * (after_mem["RssAnon"] - before_mem["RssAnon"]) / row["idle_ok"], 1)
            if row["idle_ok"]:
                row["server_anon_per_idle_b"] = round(1024 * (self.server_anon_kb() - before_anon) / row["idle_ok"], 1)
            row["server_procs_before"] = procs_before["server_procs"]
            res = self.pgbench(target, ["-S", "-M", "simple", "-c", "16", *self.jobs(16)], self.a.duration, "idle",
                               sample_at=self.a.duration / 2, sampler=self.server_procs, tls=tls)
            for k, v in res.items():
                if k not in ("first_error",) or v:
                    row[k] = v
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
            proc.stdin = None  # communicate() must not flush it
            try:
                o, _ = proc.communicate(timeout=60)
                m = re.search(r"CLOSED alive=(\d+)", o or "")
                row["idle_alive_at_end"] = int(m.group(1)) if m else None
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=10)
        self.record(row)

    def w_bulk(self, rnd, target, tls=False):
        rows = self.a.bulk_rows
        sql = f"COPY (SELECT g, repeat('x', 96) FROM generate_series(1, {rows}) g) TO STDOUT"
        before = self.snapshot(target)
        proc = subprocess.Popen([self.pg("psql"), "-X", "-q", "-c", sql], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=self.conn_env(target, tls))
        nbytes, deadline = 0, time.monotonic() + 300
        fd = proc.stdout.fileno()
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 1)
            if r:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                nbytes += len(chunk)
        rc, ru, timed_out, _ = wait_bounded(proc, time.monotonic() + 30)
        after = self.snapshot(target, settle_to=before["backends"])
        err = proc.stderr.read().decode(errors="replace")
        row = {"round": rnd, "workload": "tls_bulk" if tls else "bulk", "protocol": "simple", "clients": 1,
               "target": target, "rc": rc,
               "timed_out": int(timed_out), "bulk_bytes": nbytes, "first_error": err.strip()[:200]}
        self.account(row, before, after, ru)
        row["mb_per_s"] = round(nbytes / 1e6 / row["elapsed_s"], 1) if row["elapsed_s"] else None
        self.record(row)

    def w_profile(self, target):
        """System-wide perf sample (cpu-clock, 999 Hz) over one select-only run
        (--profile-clients, default 100), -M simple; samples grouped by process role and symbol."""
        c = self.a.profile_clients
        data = os.path.join(self.work, f"perf-{target}.data")
        d = self.a.duration
        # Sample the transactions, not the logins: with many clients pgbench
        # first spends the login allowance on SCRAM.
        allowance = self.login_allowance(c)
        perf = subprocess.Popen(["perf", "record", "-a", "-e", "cpu-clock", "-F", "999", "-o", data,
                                 "-D", str(allowance * 1000), "--", "sleep", str(allowance + d + 2)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        row = self.pgbench(target, ["-S", "-M", "simple", "-c", str(c), *self.jobs(c)], d, "profile",
                           want_log=False, clients=c, sample_at=allowance + d / 2 + 1,
                           sampler=lambda: {"_pids": set(children(self.pm_pid)) | {self.pm_pid}})
        server_pids = row.pop("_pids", set())
        rc, _, _, _ = wait_bounded(perf, time.monotonic() + allowance + d + 30)
        if rc != 0 or not os.path.exists(data):
            log(f"perf record failed for {target} (rc {rc}); no profile")
            return
        r = subprocess.run(["perf", "script", "-i", data, "-F", "comm,pid,ip,sym,dso"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, timeout=300)
        os.unlink(data)
        rx = re.compile(r"^\s*(.+?)\s+(\d+)\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")
        groups, syms, dsos, total = {}, {}, {}, 0
        for line in r.stdout.splitlines():
            m = rx.match(line)
            if not m:
                continue
            comm, pid, sym, dso = m.group(1), int(m.group(2)), m.group(3), os.path.basename(m.group(4))
            if pid == 0:
                continue  # idle
            if pid == self.pooler_pid:
                g = "nextgres pooler"
            elif pid == self.bouncer_pid:
                g = "pgbouncer"
            elif comm == "pgbench":
                g = "pgbench"
            elif pid in server_pids:
                g = "server processes"
            else:
                g = "other"
            total += 1
            groups[g] = groups.get(g, 0) + 1
            k = (g, sym if sym != "[unknown]" else f"[{dso}]", dso)
            syms[k] = syms.get(k, 0) + 1
            dsos.setdefault(g, {})
            dsos[g][dso] = dsos[g].get(dso, 0) + 1
        prof = {"target": target, "clients": c, "tps": row.get("tps"), "tx": row.get("tx"), "busy_samples": total,
                "groups": {g: n for g, n in sorted(groups.items(), key=lambda x: -x[1])},
                "top": {}, "dso": dsos}
        for g in groups:
            top = sorted(((n, sym, dso) for (gg, sym, dso), n in syms.items() if gg == g), reverse=True)[:80]
            prof["top"][g] = top
        self.profiles.append(prof)
        with open(os.path.join(self.a.out, "bench", "profile.json"), "w") as f:
            json.dump(self.profiles, f, indent=1)
        log(f"profile {target}: {row.get('tps')} tps, samples by group: {prof['groups']}")

    def priority_setup(self):
        """Database prio with two roles' pools (select-only tables owned by
        prio_hi, readable by prio_lo) sharing max_db_connections; prio_hi has
        the higher pool_priority (ALTER ROLE ... IN DATABASE)."""
        if getattr(self, "prio_ready", False):
            return
        for role in ("prio_hi", "prio_lo"):
            self.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'", db="postgres")
        self.psql("CREATE DATABASE prio OWNER prio_hi", db="postgres")
        run([self.pg("pgbench"), "-i", "-q", "-s", "1", f"host={self.work} port={self.port} user=prio_hi dbname=prio"],
            timeout=300)
        self.psql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO prio_lo", db="prio")
        self.psql(f"ALTER DATABASE prio SET nextgres.max_db_connections = {PRIO_LIMIT}", db="postgres")
        self.psql("ALTER ROLE prio_hi IN DATABASE prio SET nextgres.pool_priority = 10", db="postgres")
        self.prio_ready = True

    def w_priority(self, rnd):
        """pool_priority (nextgres only): two pgbench -S runs, PRIO_CLIENTS
        clients each, start together through pools of roles prio_hi (priority
        10) and prio_lo (0) that share max_db_connections = PRIO_LIMIT of
        database prio; each pool's waits for a backend come from
        nextgres.pools (reset first)."""
        self.priority_setup()
        self.psql("SELECT nextgres.reset_stats('prio')")  # the extension lives in database app
        d, c = self.a.duration, PRIO_CLIENTS
        rundir = os.path.join(self.work, "run-prio")
        shutil.rmtree(rundir, ignore_errors=True)
        os.makedirs(rundir)
        procs = {}
        for role in ("prio_lo", "prio_hi"):
            env = self.conn_env("nextgres")
            env.update(PGUSER=role, PGDATABASE="prio", PGAPPNAME=f"bench-priority-{role}")
            out = open(os.path.join(rundir, role + ".out"), "w+")
            err = open(os.path.join(rundir, role + ".err"), "w+")
            cmd = [self.pg("pgbench"), "-n", "-S", "-M", "simple", "-c", str(c), "-j", "1", "-T", str(d)]
            procs[role] = (subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=rundir),
                           out, err)
        t0 = time.monotonic()
        results = {}
        for role, (proc, out, err) in procs.items():
            rc, _ru, timed_out, _ = wait_bounded(proc, t0 + d + self.a.grace)
            out.seek(0)
            err.seek(0)
            results[role] = (rc, timed_out, out.read(), err.read())
            out.close()
            err.close()
        shutil.rmtree(rundir, ignore_errors=True)
        stats = {}
        for ln in self.psql("SELECT role, transactions, waits, wait_time_ms, max_wait_ms FROM nextgres.pools"
                            " WHERE database = 'prio'", check=False).splitlines():
            f = ln.split("|")
            if len(f) == 5:
                stats[f[0]] = [float(x) for x in f[1:]]
        for role, (rc, timed_out, o, e) in results.items():
            def grab(rx, cast=float):
                m = re.search(rx, o)
                return cast(m.group(1)) if m else None
            x, w, ms, mx = stats.get(role, [None] * 4)
            row = {"round": rnd, "workload": "priority", "protocol": "high" if role == "prio_hi" else "low",
                   "clients": c, "target": "nextgres", "rc": rc, "timed_out": int(timed_out), "T_s": d,
                   "tps": grab(r"tps = ([\d.]+)"), "tx": grab(r"number of transactions actually processed: (\d+)", int),
                   "failed_tx": grab(r"number of failed transactions: (\d+)", int) or 0,
                   "lat_avg_ms": grab(r"latency average = ([\d.]+) ms"),
                   "aborted_clients": len(re.findall(r"client \d+ (?:script \d+ )?aborted", e)),
                   "first_error": next((ln for ln in e.splitlines() if "error" in ln.lower() or "aborted" in ln), "")[:200],
                   "ng_handoffs": x, "ng_waits": w, "ng_wait_ms": ms, "ng_max_wait_ms": mx,
                   "ng_avg_wait_ms": round(ms / w, 3) if w else None, "prio_limit": PRIO_LIMIT}
            self.record(row)
            log(f"[r{rnd}] priority {row['protocol']:<4} pool: waits {w}, avg wait {row['ng_avg_wait_ms']} ms, "
                f"max {mx} ms, handoffs {x}")

    def warmup(self):
        for t in self.targets_for("select"):
            self.pgbench(t, ["-S", "-c", "16", *self.jobs(16)], 1, "warmup", want_log=False)

    # ---------------- the plan
    def targets_for(self, workload, order=None):
        ts = order or TARGETS
        return [t for t in ts if t != "plain" or (workload in PLAIN_WORKLOADS and self.plain_pm_pid)]

    def main(self):
        a = self.a
        self.setup()
        self.write_meta()
        self.warmup()
        for rnd in range(1, a.rounds + 1):
            k = (rnd - 1) % len(TARGETS)
            order = TARGETS[k:] + TARGETS[:k]
            log(f"round {rnd}/{a.rounds}, order {' -> '.join(order)}")
            if "idle" in a.workloads:
                for t in self.targets_for("idle", order):
                    self.w_idle(rnd, t)
            if "select" in a.workloads:
                for protocol in ("simple", "extended", "prepared"):
                    for c in a.clients:
                        for t in self.targets_for("select", order):
                            self.w_select(rnd, t, protocol, c)
            if "rate" in a.workloads:
                # RATE_SHARE of the slower pooler's TPS in this round's
                # select-only run of the same configuration
                for protocol in ("simple", "extended", "prepared"):
                    for c in (c for c in a.clients if c > POOL_SIZE):
                        got = [self.select_tps.get((rnd, protocol, c, t)) for t in RATE_TARGETS]
                        if not all(got):
                            log(f"rate -M {protocol} c={c}: no select-only TPS of both poolers in this round, skipped")
                            continue
                        rate = int(RATE_SHARE * min(got))
                        for t in [t for t in order if t in RATE_TARGETS]:
                            self.w_rate(rnd, t, protocol, c, rate)
            if "tpcb" in a.workloads:
                for c in a.tpcb_clients:
                    for t in self.targets_for("tpcb", order):
                        self.w_tpcb(rnd, t, c)
            if "storm" in a.workloads:
                for t in self.targets_for("storm", order):
                    self.w_storm(rnd, t)
            if "bulk" in a.workloads:
                for t in self.targets_for("bulk", order):
                    self.w_bulk(rnd, t)
            if "tls" in a.workloads and self.tls:
                for c in (16, 100):
                    for t in self.targets_for("tls", order):
                        self.w_tls_select(rnd, t, c)
                for t in self.targets_for("tls", order):
                    self.w_bulk(rnd, t, tls=True)
            if ("tls" in a.workloads or "tls_idle" in a.workloads) and self.tls:
                if rnd == 1:  # pooler memory grows only in a run's first idle test (see report.py)
                    for t in self.targets_for("tls", order):
                        self.w_idle(rnd, t, tls=True)
            if "priority" in a.workloads:
                self.w_priority(rnd)
        if a.profile:
            if shutil.which("perf"):
                log(f"perf profiles: select-only, {a.profile_clients} clients, -M simple")
                for t in self.targets_for("profile"):
                    self.w_profile(t)
            else:
                log("no perf (Debian package linux-perf): no profiles")
        self.meta["wall_s"] = round(time.monotonic() - self.t_start, 1)
        self.meta["pooler_alive_at_end"] = os.path.exists(f"/proc/{self.pooler_pid}")
        self.meta["pooler_pid_at_end"] = self.psql("SELECT pooler_pid FROM nextgres.status()", check=False)
        counts = {}
        for ln in read(self.logs + "/postgresql.log").splitlines():
            m = re.search(r"\] (\S*) ?\b(PANIC|FATAL|ERROR|WARNING|LOG):\s+(.*)", ln)
            if m and (m.group(2) != "LOG" or "terminated by signal" in ln or "exited with exit code" in ln):
                who = m.group(1).replace("bench-", "") or "-"
                key = f"{who}\t{m.group(2)}: " + re.sub(r"\d+", "N", m.group(3))[:150]
                counts[key] = counts.get(key, 0) + 1
        self.meta["server_log_summary"] = sorted(([n, k] for k, n in counts.items()), reverse=True)[:15]
        self.write_meta()

    def write_meta(self):
        a = self.a

        def first_line(cmd):
            try:
                return run(cmd, timeout=30, check=False).stdout.strip().splitlines()[0]
            except Exception:  # noqa: BLE001 - report what we can
                return "?"
        cpu = re.search(r"model name\s*:\s*(.*)", read("/proc/cpuinfo"))
        mem = re.search(r"MemTotal:\s*(\d+)", read("/proc/meminfo"))
        others = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                t = title(d)
                f = proc_stat_fields(d)
                if t.startswith(("postgres", "/opt/nextgres-pg", "/usr/lib/postgresql", "cargo", "rustc")) and f \
                        and int(d) != self.pm_pid and int(f[1]) != self.pm_pid:
                    others.append(t[:80])
        git = run(["git", "-C", self.repo, "describe", "--always", "--dirty"], timeout=30, check=False).stdout.strip() \
            or read(os.path.join(self.repo, "GIT")).strip()  # a pack (tools/bench --pack) has no .git
        self.meta = getattr(self, "meta", {})
        self.meta.update({
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "mode": "quick" if a.quick else "full",
            "command": "tools/bench " + " ".join(a.argv),
            "nproc": os.cpu_count(),
            "mem_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
            "cpu_model": cpu.group(1) if cpu else "?",
            "kernel": platform.release(),
            "os": (re.search(r'PRETTY_NAME="(.*)"', read("/etc/os-release")) or [None, "?"])[1],
            "loadavg_at_start": read("/proc/loadavg").split()[:3],
            "other_pg_or_build_procs_at_start": len(others),
            "postgres": first_line([self.pg("postgres"), "--version"]),
            "pgbench": first_line([self.pg("pgbench"), "--version"]),
            "pgbouncer": first_line(["pgbouncer", "--version"]),
            "nextgres": f"{report.cargo_version(self.repo)} (git {git}, release build, sha256 {a.so_sha[:12]})",
            "python": platform.python_version(),
            "rounds": a.rounds, "duration_s": a.duration, "clients": a.clients, "tpcb_clients": a.tpcb_clients,
            "pgbench_jobs": a.jobs,
            "scale": a.scale, "idle": a.idle, "idle_direct": min(a.idle, a.idle_direct),
            "storm_clients": a.storm_clients, "bulk_rows": a.bulk_rows, "pool_size": POOL_SIZE,
            "pg_settings": getattr(self, "pg_settings", {}),
            "plain": bool(self.plain_pm_pid),
            "bouncer_settings": {k: v for k, v in getattr(self, "bouncer_settings", {}).items()
                                 if k not in ("logfile", "pidfile", "auth_file")},
        })
        os.makedirs(os.path.join(a.out, "bench"), exist_ok=True)
        with open(os.path.join(a.out, "bench", "meta.json"), "w") as f:
            json.dump(self.meta, f, indent=1)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="tools/bench")
    ap.add_argument("--quick", action="store_true", help="1 round, tiny durations (CI: keeps the tool working)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=int, help="seconds per pgbench run")
    ap.add_argument("--out", help="where BENCHMARKS.md and bench/ go (default: repo root; --quick: work dir)")
    ap.add_argument("--workloads", default="idle,select,rate,tpcb,storm,bulk,tls,priority")
    ap.add_argument("--clients", help="select-only client counts, comma separated")
    ap.add_argument("--idle", type=int, help="idle clients (default 10,000; --quick 500)")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                    help="perf profiles of one 100-client run per target (default: on, off with --quick)")
    ap.add_argument("--profile-clients", type=int, default=100)
    ap.add_argument("--report-only", action="store_true", help="rebuild BENCHMARKS.md and charts from bench/results.csv")
    ap.add_argument("--repo", required=True)
    ap.add_argument("--bindir", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--so-sha", dest="so_sha", default="")
    ap.add_argument("--so-path", dest="so_path", default="")
    ap.add_argument("--base-port", type=int, default=25432)
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                    help="a server setting for the run, repeatable (e.g. nextgres.backend_batch_scheduling=off: "
                         "an A/B of a nextgres setting on a lent machine needs no rebuild); nextgres.* settings "
                         "stay off the cluster without nextgres (matched case-insensitively); quote a string "
                         "value as postgresql.conf wants it, e.g. \"nextgres.client_time_slice='1ms'\"")
    ap.add_argument("--jobs", type=int, default=2,
                    help="pgbench threads (-j) per run, at most one per client (default 2: this project's 2-core machine)")
    a = ap.parse_args(argv)
    internal, shown, skip = ("--repo", "--bindir", "--work", "--so-sha", "--so-path"), [], False
    for x in argv:
        if skip:
            skip = False
        elif x in internal:
            skip = True
        elif not x.startswith(internal):
            shown.append(x)
    a.argv = shown
    try:
        a.settings = [tuple(x.split("=", 1)) for x in a.settings]
        if any(not n.strip() or not v.strip() for n, v in a.settings):
            raise ValueError
    except ValueError:
        ap.error("--set takes NAME=VALUE")
    q = a.quick
    a.rounds = a.rounds or (1 if q else 3)
    a.duration = a.duration or (1 if q else 6)
    # --quick leaves out 1,000 clients: their scram-sha-256 logins alone take pgbench ~6 s of CPU
    a.clients = [int(x) for x in a.clients.split(",")] if a.clients else ([1, 16, 100] if q else [1, 16, 100, 1000])
    a.login_s = 0.007  # seconds of -T added per client for logins (see Bench.pgbench)
    a.tpcb_clients = [16, 100]
    a.scale = 1 if q else 10
    a.idle = a.idle or (500 if q else 10000)
    a.idle_direct = 500 if q else 1000
    a.idle_connect_timeout = 900  # 10,000 TLS logins at ~40/s on a loaded 2-core machine
    a.storm_clients = 16
    a.bulk_rows = 200_000 if q else 2_000_000
    a.grace = 120  # seconds past -T before a pgbench is killed (1,000 logins take a while)
    a.workloads = set(a.workloads.split(","))
    a.profile = (not q) if a.profile is None else a.profile
    a.out = a.out or (os.path.join(a.work, "quick-results") if q else a.repo)
    return a


def main():
    a = parse_args(sys.argv[1:])
    if a.report_only:
        report.build(a.out)
        return
    b = Bench(a)

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        b.main()
    finally:
        log("stopping PgBouncer and the cluster")
        try:
            b.teardown(remove=True)
        except Exception as e:  # noqa: BLE001 - the wrapper's trap tries again
            log(f"teardown: {e}")
    if not os.path.exists(b.csv_path):
        # --workloads none (a profile-only run): nothing to tabulate.
        log(f"done in {time.monotonic() - b.t_start:.0f} s; no workload ran, so no report (see {a.out}/bench/)")
        return
    report.build(a.out)
    log(f"done in {time.monotonic() - b.t_start:.0f} s; wrote {a.out}/BENCHMARKS.md and {a.out}/bench/")


if __name__ == "__main__":
    main()
