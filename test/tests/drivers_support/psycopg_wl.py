"""psycopg 3 at its defaults (prepare_threshold 5): pipeline mode,
executemany, COPY and server-side (named) cursors: the driver matrix
workload (see drivers.rs), one thread per connection.

python psycopg_wl.py CONNINFO CONNECTIONS ITERATIONS
Prints one JSON object: per-connection results and the errors seen.
"""
import json, sys, threading
import psycopg

conninfo, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
results = {}
errors = []
lock = threading.Lock()


def one(c):
    out = []
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f"SET search_path = s{c}, public")
            for i in range(k):
                out.append(conn.execute("SELECT %s::int * 2", (i,)).fetchone()[0])
                with conn.transaction():
                    conn.execute("CREATE TEMP TABLE t_commit(a int) ON COMMIT DROP")
                    with conn.cursor() as cur:
                        cur.executemany("INSERT INTO t_commit VALUES (%s)", [(j,) for j in range(i + 1)])
                    with conn.cursor() as cur:
                        with cur.copy("COPY t_commit (a) FROM STDIN") as cp:
                            for j in range(3):
                                cp.write_row((100 + j,))
                    out.append(conn.execute("SELECT count(*), sum(a) FROM t_commit WHERE a >= %s", (0,)).fetchone())
                with conn.pipeline():
                    conn.execute("CREATE TEMP TABLE t_pipe(a int)")
                    conn.execute("INSERT INTO t_pipe VALUES (%s)", (i,))
                    cur = conn.execute("SELECT a + 1 FROM t_pipe")
                    conn.execute("DROP TABLE t_pipe")
                out.append(cur.fetchone()[0])
                with conn.transaction():
                    conn.execute("CREATE TEMP TABLE t_del(a int) ON COMMIT DELETE ROWS")
                    conn.execute("INSERT INTO t_del SELECT generate_series(1, %s)", (i + 1,))
                    out.append(conn.execute("SELECT sum(a) FROM t_del").fetchone()[0])
                out.append(conn.execute("SELECT count(*) FROM t_del").fetchone()[0])
                conn.execute("DROP TABLE t_del")
                conn.execute("CREATE TABLE mid(a int, b text)")
                conn.execute("INSERT INTO mid VALUES (%s, %s)", (i, f"m{i}"))
                out.append(conn.execute("SELECT a, b FROM mid").fetchall())
                conn.execute("DROP TABLE mid")
                conn.execute(f"ALTER TABLE items ADD COLUMN x{i} int DEFAULT {i}")
                out.append(conn.execute("SELECT id, v FROM items WHERE id >= %s ORDER BY id", (0,)).fetchall())
                with conn.transaction():
                    with conn.cursor(name=f"big{i}") as cur:
                        cur.itersize = 7
                        cur.execute("SELECT g FROM generate_series(1, %s) g", (20 + i,))
                        out.append(sum(r[0] for r in cur))
                conn.execute("SET search_path = public")
                out.append(conn.execute("SELECT current_schemas(false)::text").fetchone()[0])
                conn.execute(f"SET search_path = s{c}, public")
    except Exception as e:
        with lock:
            errors.append(f"psycopg{c}: {type(e).__name__}: {e}")
    with lock:
        results[f"psycopg{c}"] = out


threads = [threading.Thread(target=one, args=(c,)) for c in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"results": results, "errors": errors}, sort_keys=True, default=str))
