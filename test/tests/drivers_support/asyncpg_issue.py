"""asyncpg at its defaults (pool, statement cache): issue 10's three failing
inputs, exactly as filed (see drivers.rs, `asyncpg_issue_inputs`).

python asyncpg_issue.py HOST PORT USER DB

1. temp_commit_drop: 16 connections, each 20 times: fetchval("SELECT $1::int", i),
   then in a transaction CREATE TEMP TABLE IF NOT EXISTS t_x(a int) ON COMMIT DROP
   and fetchval("SELECT count(*) FROM t_x WHERE a > $1", i) (the cached statement
   names a table that exists only inside the transaction).
2. add_column: 16 connections fetch("SELECT * FROM chg") once; another session
   runs ALTER TABLE chg ADD COLUMN b int DEFAULT 7; each connection repeats the
   fetch 10 times (directly the server answers 0A000 and asyncpg re-prepares).
3. lastval: 32 connections, each 30 times INSERT INTO lv(who) VALUES (c) then
   SELECT lastval() as separate statements; the row with that id must be c's.

Prints one JSON object: per-connection results, the errors seen, and per
connection the backend pids it was served by (outside the compared results).
"""
import asyncio, json, sys
import asyncpg

host, port, user, db = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
results = {}
errors = []
pids = {}


async def pid(conn, key):
    pids.setdefault(key, set()).add(await conn.fetchval("SELECT pg_backend_pid()"))


async def temp_commit_drop(pool, c):
    key = f"temp{c}"
    out = results.setdefault(key, [])
    async with pool.acquire() as conn:
        for i in range(20):
            try:
                out.append(await conn.fetchval("SELECT $1::int", i))
                async with conn.transaction():
                    await conn.execute("CREATE TEMP TABLE IF NOT EXISTS t_x(a int) ON COMMIT DROP")
                    out.append(await conn.fetchval("SELECT count(*) FROM t_x WHERE a > $1", i))
                await pid(conn, key)
            except Exception as e:
                errors.append(f"{key} iteration {i}: {type(e).__name__}: {e}")


async def add_column(pool, n, alter):
    conns = [await pool.acquire() for _ in range(n)]
    try:
        for c, conn in enumerate(conns):
            try:
                results.setdefault(f"chg{c}", []).append([tuple(r) for r in await conn.fetch("SELECT * FROM chg")])
            except Exception as e:
                errors.append(f"chg{c} first fetch: {type(e).__name__}: {e}")
        try:
            await alter()
        except Exception as e:
            errors.append(f"ALTER TABLE chg: {type(e).__name__}: {e}")

        async def again(c, conn):
            for i in range(10):
                try:
                    results[f"chg{c}"].append([tuple(r) for r in await conn.fetch("SELECT * FROM chg")])
                    await pid(conn, f"chg{c}")
                except Exception as e:
                    errors.append(f"chg{c} fetch {i}: {type(e).__name__}: {e}")

        await asyncio.gather(*(again(c, conn) for c, conn in enumerate(conns)))
    finally:
        for conn in conns:
            await pool.release(conn)


async def lastval(pool, c):
    key = f"lastval{c}"
    out = results.setdefault(key, [])
    async with pool.acquire() as conn:
        for i in range(30):
            try:
                await conn.execute("INSERT INTO lv(who) VALUES ($1)", c)
                v = await conn.fetchval("SELECT lastval()")
                out.append(await conn.fetchval("SELECT who FROM lv WHERE id = $1", v))
                await pid(conn, key)
            except Exception as e:
                errors.append(f"{key} iteration {i}: {type(e).__name__}: {e}")


async def main():
    kw = dict(host=host, port=port, user=user, database=db)
    pool = await asyncpg.create_pool(**kw, min_size=16, max_size=16)
    try:
        await asyncio.gather(*(temp_commit_drop(pool, c) for c in range(16)))

        async def alter():
            other = await asyncpg.connect(**kw)
            try:
                await other.execute("ALTER TABLE chg ADD COLUMN b int DEFAULT 7")
            finally:
                await other.close()

        await add_column(pool, 16, alter)
    finally:
        await pool.close()
    pool = await asyncpg.create_pool(**kw, min_size=32, max_size=32)
    try:
        await asyncio.gather(*(lastval(pool, c) for c in range(32)))
    finally:
        await pool.close()
    print(json.dumps({"results": results, "errors": errors,
                      "pids": {k: len(v) for k, v in pids.items()}}, sort_keys=True, default=str))


asyncio.run(main())
