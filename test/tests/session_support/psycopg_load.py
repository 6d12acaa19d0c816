"""psycopg 3 clients through a transaction pool smaller than their number.

Run by session_drivers.rs: python psycopg_load.py CONNINFO CLIENTS XACTS

Each client (a thread with its own connection) uses server-side prepared
statements for everything (prepare_threshold=0: psycopg names them _pg3_0,
_pg3_1, ... per connection, so the same names mean different statements in
different clients), sets session state (search_path, a custom setting,
application_name) once, then runs XACTS transactions and checks its own
state and rows every time. Half the clients run in autocommit mode with
explicit transaction blocks, half in psycopg's default (implicit BEGIN).

Prints one summary line and exits 1 if any client saw an error.
"""
import sys
import threading
import traceback

import psycopg

conninfo, clients, xacts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
errors = []
prepared_seen = {}
lock = threading.Lock()


def fail(i, what):
    with lock:
        errors.append(f"client {i}: {what}")


def worker(i):
    try:
        autocommit = i % 2 == 0
        with psycopg.connect(conninfo, prepare_threshold=0, autocommit=autocommit) as conn:
            # A statement text unique to this client comes first, so its
            # _pg3_0 differs from every other client's _pg3_0.
            conn.execute(f"SELECT %s::int + {i}", (1,)).fetchone()
            conn.execute(f"SET search_path = s{i}, public")
            conn.execute("SELECT set_config('myapp.client', %s, false)", (f"c{i}",))
            conn.execute(f"SET application_name = 'py{i}'")
            if not autocommit:
                conn.commit()
            want = (f"c{i}", f"s{i}, public", f"py{i}")
            for t in range(xacts):
                with conn.transaction():
                    conn.execute("INSERT INTO own (n) VALUES (%s)", (t,))
                    n = conn.execute(
                        "UPDATE marks SET n = n + 1 WHERE client = %s RETURNING n", (i,)
                    ).fetchone()[0]
                    row = conn.execute(
                        "SELECT count(*), current_setting('myapp.client'),"
                        " current_setting('search_path'), current_setting('application_name')"
                        " FROM own WHERE n <= %s",
                        (t,),
                    ).fetchone()
                if n != t + 1 or row[0] != t + 1 or tuple(row[1:]) != want:
                    fail(i, f"transaction {t}: marks={n} row={row} want count {t + 1} and {want}")
                    return
                # Outside a transaction block too (one statement each).
                v = conn.execute(f"SELECT %s::int + {i}", (t,)).fetchone()[0]
                if v != t + i:
                    fail(i, f"statement {t}: {v} != {t + i}")
                    return
                if not autocommit:
                    conn.commit()
            names = [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM pg_prepared_statements WHERE NOT from_sql ORDER BY name"
                ).fetchall()
            ]
            if not autocommit:
                conn.commit()
            with lock:
                prepared_seen[i] = names
            if not any(n.startswith("_pg3_") for n in names):
                fail(i, f"no server-side prepared statements of psycopg's: {names}")
    except Exception as e:  # any error counts; keep the whole story
        fail(i, f"{type(e).__name__}: {e}\n{traceback.format_exc()}")


threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
for th in threads:
    th.start()
for th in threads:
    th.join()

sample = prepared_seen.get(0, [])
print(
    f"psycopg {psycopg.__version__}: clients={clients} xacts={xacts} errors={len(errors)}"
    f" client0_prepared={sample}"
)
for e in errors[:20]:
    print(e)
sys.exit(1 if errors else 0)
