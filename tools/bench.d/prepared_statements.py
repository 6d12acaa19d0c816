"""Prepared-statement switching cost (issue 10's measurement): 16 asyncpg
connections each holding 500 prepared statements run random ones for a few
seconds, directly and through nextgres; prints queries/s and the ratio.

    /var/tmp/nextgres-drivers-venv/bin/python tools/bench.d/prepared_statements.py \\
        --direct /path/to/socket/dir --pooled 127.0.0.1 --port 5432 --user app [--seconds 8]

(the venv comes from test/tests/drivers_support/install.sh). Not a test:
it asserts nothing about speed. With --postmaster-pid (the server's
postmaster.pid, on the same machine) it also prints the server's CPU per
query over the timed loop: utime+stime of the postmaster's children from
/proc (exited ones through the postmaster's cutime/cstime), steadier than
queries/s on a machine shared with other load.
"""
import argparse, asyncio, random, time
import asyncpg

ap = argparse.ArgumentParser()
ap.add_argument("--direct", required=True, help="host for direct connections (a Unix socket directory)")
ap.add_argument("--pooled", required=True, help="host for connections through nextgres")
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--user", default="postgres")
ap.add_argument("--database", default="postgres")
ap.add_argument("--connections", type=int, default=16)
ap.add_argument("--statements", type=int, default=500)
ap.add_argument("--seconds", type=float, default=8)
ap.add_argument("--postmaster-pid", help="the server's postmaster.pid: also print its CPU per query")
args = ap.parse_args()


def server_cpu_ticks():
    """CPU clock ticks used so far by the postmaster's children (live ones
    and, through cutime/cstime, reaped ones); None without --postmaster-pid."""
    if not args.postmaster_pid:
        return None
    import os
    with open(args.postmaster_pid) as f:
        pm = f.readline().strip()

    def stat(pid):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # fields from 3 (state) on

    ticks = sum(int(x) for x in stat(pm)[13:15])  # cutime, cstime
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = stat(d)
            except OSError:
                continue
            if st[1] == pm:
                ticks += int(st[11]) + int(st[12])  # utime, stime
    return ticks


async def run(host):
    conns = [await asyncpg.connect(host=host, port=args.port, user=args.user, database=args.database,
                                   statement_cache_size=args.statements * 2)
             for _ in range(args.connections)]
    texts = [f"SELECT $1::int + {k}" for k in range(args.statements)]
    # Through the statement cache the timed loop uses (Connection.prepare()
    # would make uncached statements, closed again once collected).
    for c in conns:
        for k, t in enumerate(texts):
            assert await c.fetchval(t, 0) == k
    count = errors = 0
    cpu0 = server_cpu_ticks()
    stop = time.monotonic() + args.seconds

    async def loop(c):
        nonlocal count, errors
        r = random.Random()
        while time.monotonic() < stop:
            k = r.randrange(len(texts))
            try:
                assert await c.fetchval(texts[k], 1) == 1 + k
                count += 1
            except Exception:
                errors += 1

    await asyncio.gather(*(loop(c) for c in conns))
    if cpu0 is not None:
        import os
        us = (server_cpu_ticks() - cpu0) / os.sysconf("SC_CLK_TCK") * 1e6 / max(count, 1)
        print(f"{host}: server CPU {us:.1f} us/query over {count} queries")
    for c in conns:
        await c.close()
    return count / args.seconds, errors


async def main():
    d, de = await run(args.direct)
    p, pe = await run(args.pooled)
    print(f"direct {d:.0f} queries/s ({de} errors), nextgres {p:.0f} queries/s ({pe} errors), ratio {p / d:.2f}")


asyncio.run(main())
