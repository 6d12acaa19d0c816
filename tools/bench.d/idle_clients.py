#!/usr/bin/env python3
"""Open N authenticated PostgreSQL connections and hold them idle.

Standard library only: the v3 startup packet and the SCRAM-SHA-256 exchange
(also trust, cleartext and md5) are done by hand over asyncio streams, so
10,000 connections cost one process and a few hundred MB at most.

    idle_clients.py --host 127.0.0.1 --port 6432 --user app --password pw \
                    --dbname app -n 10000

Prints one line `READY ok=N failed=M seconds=S first_error=...` once every
connection attempt has finished, then holds the connections until standard
input closes or SIGTERM/SIGINT arrives, then sends Terminate on each, closes
them and prints `CLOSED alive=K` (K: connections the server had not closed).
Every step is bounded: --connect-timeout per connection, --hold-timeout overall.
--tls sends SSLRequest and runs the connection over TLS (certificate not
verified, as sslmode=require).
"""
import argparse
import asyncio
import base64
import hashlib
import hmac
import os
import resource
import signal
import ssl
import struct
import sys
import time

_SALTED = {}  # (salt, iterations) -> SaltedPassword; the role's salt never changes


def msg(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!I", len(body) + 4) + body


async def read_msg(reader):
    head = await reader.readexactly(5)
    tag, length = head[:1], struct.unpack("!I", head[1:])[0]
    body = await reader.readexactly(length - 4) if length > 4 else b""
    return tag, body


def error_text(body: bytes) -> str:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return f"{fields.get('S', 'ERROR')} {fields.get('C', '')}: {fields.get('M', '')}"


async def login(host, port, user, password, dbname, tls=False):
    reader, writer = await asyncio.open_connection(host, port)
    if tls:
        # SSLRequest (protocol 54.2.10), then TLS on the same stream; like
        # sslmode=require: encrypted, the certificate not verified.
        writer.write(struct.pack("!II", 8, 80877103))
        await writer.drain()
        if await reader.readexactly(1) != b"S":
            writer.close()
            raise RuntimeError("server refused SSLRequest")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        await writer.start_tls(ctx)
    params = b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                      for k, v in (("user", user), ("database", dbname), ("application_name", "bench-idle")))
    body = struct.pack("!I", 196608) + params + b"\0"
    writer.write(struct.pack("!I", len(body) + 4) + body)
    await writer.drain()
    client_first_bare = server_first = None
    salted = None
    while True:
        tag, body = await read_msg(reader)
        if tag == b"E":
            writer.close()
            raise RuntimeError(error_text(body))
        if tag == b"R":
            code = struct.unpack("!I", body[:4])[0]
            if code == 0:
                continue
            if code == 3:  # cleartext
                writer.write(msg(b"p", password.encode() + b"\0"))
            elif code == 5:  # md5
                inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode()
                outer = b"md5" + hashlib.md5(inner + body[4:8]).hexdigest().encode()
                writer.write(msg(b"p", outer + b"\0"))
            elif code == 10:  # SASL
                mechs = body[4:].split(b"\0")
                if b"SCRAM-SHA-256" not in mechs:
                    raise RuntimeError(f"no SCRAM-SHA-256 among {mechs}")
                nonce = base64.b64encode(os.urandom(18)).decode()
                client_first_bare = f"n=,r={nonce}"
                first = ("n,," + client_first_bare).encode()
                writer.write(msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first))
            elif code == 11:  # SASLContinue: server-first-message
                server_first = body[4:].decode()
                attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
                salt, iters = base64.b64decode(attrs["s"]), int(attrs["i"])
                salted = _SALTED.get((salt, iters))
                if salted is None:
                    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iters)
                    _SALTED[(salt, iters)] = salted
                final_wo_proof = f"c=biws,r={attrs['r']}"
                auth_msg = f"{client_first_bare},{server_first},{final_wo_proof}".encode()
                client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
                stored_key = hashlib.sha256(client_key).digest()
                sig = hmac.new(stored_key, auth_msg, hashlib.sha256).digest()
                proof = bytes(a ^ b for a, b in zip(client_key, sig))
                writer.write(msg(b"p", f"{final_wo_proof},p={base64.b64encode(proof).decode()}".encode()))
            elif code == 12:  # SASLFinal
                continue
            else:
                raise RuntimeError(f"unsupported authentication request {code}")
            await writer.drain()
        elif tag == b"Z":
            return reader, writer
        # 'S' ParameterStatus, 'K' BackendKeyData, 'N' notices: ignore


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", default=os.environ.get("PGPASSWORD", ""))
    ap.add_argument("--dbname", required=True)
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=128, help="logins in flight at once")
    ap.add_argument("--connect-timeout", type=float, default=30)
    ap.add_argument("--hold-timeout", type=float, default=600)
    ap.add_argument("--tls", action="store_true", help="SSLRequest + TLS (sslmode=require)")
    a = ap.parse_args()
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.host.startswith("127."):
        sys.exit("idle_clients.py only connects to loopback addresses")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, a.n + 256) if hard != resource.RLIM_INFINITY else a.n + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    sem = asyncio.Semaphore(a.parallel)
    conns, errors = [], []

    async def one():
        async with sem:
            try:
                conns.append(await asyncio.wait_for(
                    login(a.host, a.port, a.user, a.password, a.dbname, a.tls), a.connect_timeout))
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(a.n)))
    secs = time.monotonic() - t0
    first = errors[0].replace("\n", " ")[:200] if errors else ""
    print(f"READY ok={len(conns)} failed={len(errors)} seconds={secs:.3f} first_error={first}", flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: (os.read(sys.stdin.fileno(), 4096) or stop.set()) and None)
    try:
        await asyncio.wait_for(stop.wait(), a.hold_timeout)
    except asyncio.TimeoutError:
        print("hold timeout reached", file=sys.stderr)
    alive = 0
    for reader, writer in conns:
        if not reader.at_eof():
            alive += 1
        try:
            writer.write(msg(b"X", b""))
            writer.close()
        except Exception:  # noqa: BLE001 - closing a dead socket is fine
            pass
    await asyncio.sleep(0.2)
    print(f"CLOSED alive={alive}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
