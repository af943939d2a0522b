"""A small HTTP/1.1 load generator for the benchmarks: keep-alive connections on asyncio (uvloop),
closed loop or paced to a target rate, counting every status and timing the accepted (200) answers
separately from the refused ones (wrk mixes them in one latency histogram).

    python benchmarks/loadgen.py URL BODY_FILE HEADERS_JSON --connections 256 --rate 1600 --duration 60

Prints one JSON line: statuses, errors, timeouts, throughput, and latency percentiles of the 200s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit

import numpy as np


async def _connection(host: str, port: int, request: bytes, stats: dict, stop_at: float, interval: float,
                      start: float, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    next_at = start
    reader = writer = None
    while loop.time() < stop_at:
        if interval:
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = max(next_at + interval, loop.time() - interval)  # no catch-up bursts after a stall
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            started = time.perf_counter()
            writer.write(request)
            status_line = await asyncio.wait_for(reader.readline(), timeout)
            if not status_line:
                raise ConnectionResetError
            status = int(status_line.split()[1])
            length, close = 0, False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                elif name.lower() == "connection" and value.strip().lower() == "close":
                    close = True
            await reader.readexactly(length)
            elapsed = time.perf_counter() - started
            stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
            if status == 200:
                stats["ok_latency"].append(elapsed)
            if close:
                writer.close()
                writer = None
        except asyncio.TimeoutError:
            stats["timeouts"] += 1
            if writer:
                writer.close()
            writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            stats["errors"] += 1
            if writer:
                writer.close()
            writer = None
            await asyncio.sleep(0.01)
    if writer:
        writer.close()


async def run(url: str, body: bytes, headers: dict, connections: int, rate: float, duration: float,
              timeout: float = 30.0) -> dict:
    parts = urlsplit(url)
    head = f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    request = head.encode() + body
    stats = {"statuses": {}, "ok_latency": [], "errors": 0, "timeouts": 0}
    loop = asyncio.get_running_loop()
    start = loop.time()
    cpu_start = time.process_time()
    interval = connections / rate if rate else 0.0
    tasks = [asyncio.ensure_future(_connection(parts.hostname, parts.port, request, stats, start + duration,
                                               interval, start + i * interval / connections, timeout))
             for i in range(connections)]
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    cpu = time.process_time() - cpu_start
    latency = np.asarray(stats["ok_latency"]) * 1000
    pct = (lambda q: float(np.percentile(latency, q))) if len(latency) else (lambda q: float("nan"))
    total = sum(stats["statuses"].values())
    return {"connections": connections, "rate": rate, "seconds": elapsed, "requests": total,
            "statuses": {str(k): v for k, v in sorted(stats["statuses"].items())}, "errors": stats["errors"],
            "timeouts": stats["timeouts"], "ok_per_s": len(latency) / elapsed, "offered_per_s": total / elapsed,
            "ok_p50_ms": pct(50), "ok_p99_ms": pct(99), "cpu_share": cpu / elapsed, "ok_max_ms": float(latency.max()) if len(latency) else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("body_file")
    parser.add_argument("headers_json")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s in total (0: closed loop)")
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    body = open(args.body_file, "rb").read()
    result = asyncio.run(run(args.url, body, json.loads(args.headers_json), args.connections, args.rate, args.duration))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
