"""An HTTP proxy for bench/s3.sh: holds every request for a fixed latency,
then forwards it to an S3 endpoint, and counts requests by method.

    s3proxy.py UPSTREAM_PORT LATENCY_MS [LOG]

Listens on a free port of 127.0.0.1 and prints `listening PORT` once ready.
Each request is read whole (body included), held LATENCY_MS, sent to
127.0.0.1:UPSTREAM_PORT over a connection of its own, and the answer is
relayed whole. Requests on different client connections wait concurrently,
so the delay adds latency, not a rate limit.

GET /__bench/stats answers a JSON object of counters since the start:
requests per method, conditional PUTs (If-None-Match or If-Match), bytes
in request and response bodies. It is not counted and not delayed.
With LOG, every forwarded request is appended to that file as one line:
seconds since the start, method, target, status, bytes up, bytes down.
"""

import asyncio
import json
import sys
import time

upstream_port = int(sys.argv[1])
latency = float(sys.argv[2]) / 1000.0
log = open(sys.argv[3], "a", buffering=1) if len(sys.argv) > 3 and sys.argv[3] else None
started = time.monotonic()
stats = {"GET": 0, "PUT": 0, "HEAD": 0, "POST": 0, "DELETE": 0, "other": 0,
         "conditional_put": 0, "bytes_up": 0, "bytes_down": 0}


class BadRequest(Exception):
    pass


def parse_head(raw):
    lines = raw.decode("latin-1").split("\r\n")
    first = lines[0]
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(f"bad header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return first, headers


def header(headers, name):
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


async def read_chunked(reader):
    """Decodes a chunked body (trailers are dropped)."""
    parts = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def read_body(reader, headers):
    te = header(headers, "transfer-encoding")
    if te is not None and "chunked" in te.lower():
        return await read_chunked(reader)
    length = header(headers, "content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    return b""


HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect",
       "proxy-connection", "te", "upgrade"}


async def forward(method, target, headers, body):
    """One request upstream on a fresh connection; the whole answer back."""
    r, w = await asyncio.open_connection("127.0.0.1", upstream_port)
    try:
        out = [f"{method} {target} HTTP/1.1"]
        out += [f"{k}: {v}" for k, v in headers if k.lower() not in HOP]
        out += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        w.write("\r\n".join(out).encode("latin-1") + body)
        await w.drain()
        while True:
            status_line, rheaders = parse_head((await r.readuntil(b"\r\n\r\n"))[:-4])
            status = int(status_line.split()[1])
            if status >= 200:
                break
        if method == "HEAD" or status in (204, 304):
            rbody = b""
        else:
            te = header(rheaders, "transfer-encoding")
            length = header(rheaders, "content-length")
            if te is not None and "chunked" in te.lower():
                rbody = await read_chunked(r)
            elif length is not None:
                rbody = await r.readexactly(int(length))
            else:
                rbody = await r.read()
        return status_line, rheaders, rbody
    finally:
        w.close()


async def serve(reader, writer):
    try:
        while True:
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            first, headers = parse_head(raw[:-4])
            parts = first.split()
            if len(parts) != 3:
                raise BadRequest(f"bad request line {first!r}")
            method, target, _ = parts
            expect = header(headers, "expect")
            if expect is not None and expect.lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
            body = await read_body(reader, headers)
            if target.startswith("/__bench/stats"):
                payload = json.dumps(stats).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
                await writer.drain()
                continue
            stats[method if method in stats else "other"] += 1
            if method == "PUT" and (header(headers, "if-none-match") or header(headers, "if-match")):
                stats["conditional_put"] += 1
            stats["bytes_up"] += len(body)
            await asyncio.sleep(latency)
            status_line, rheaders, rbody = await forward(method, target, headers, body)
            stats["bytes_down"] += len(rbody)
            if log:
                log.write(f"{time.monotonic() - started:.3f} {method} {target} {status_line.split()[1]} "
                          f"{len(body)} {len(rbody)}\n")
            out = [status_line]
            out += [f"{k}: {v}" for k, v in rheaders if k.lower() not in HOP]
            if method == "HEAD":
                length = header(rheaders, "content-length")
                if length is not None:
                    out.append(f"Content-Length: {length}")
            else:
                out.append(f"Content-Length: {len(rbody)}")
            out += ["", ""]
            writer.write("\r\n".join(out).encode("latin-1") + rbody)
            await writer.drain()
            conn = header(headers, "connection")
            if conn is not None and conn.lower() == "close":
                return
    except (BadRequest, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        print(f"s3proxy: dropping a connection: {e}", file=sys.stderr)
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0, limit=1 << 20, backlog=256)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
