"""A lean MQTT 3.1.1 load generator for the stream benchmark: one raw socket, a closed loop of
``--in-flight`` requests, each answer sending the next, as wrk keeps its connections busy for HTTP.

    python benchmarks/mqtt_load.py --port 1883 --request-topic T --answer-topic T --body FILE \
        --in-flight 8 --duration 6 --qos 1

Why not paho: a paho client in Python costs 150-300 us of CPU per request and answer on its own
thread, about what the agent spends answering, so on a 2-core host it measures the generator as much
as the agent; this one parses and writes packets in batches from one buffer (40-55 us per answer measured),
which is closer to what wrk costs the HTTP rows. Prints one JSON line: answers/s and latency
percentiles (answers with outputs only), answers that carried an error, requests never answered
(replaced after 2 s, so the loop keeps its size), and the generator's and the agent's CPU per answer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import struct
import time

import numpy as np

ANSWER_ID = re.compile(rb'"id": ?"(\d+)"')


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _length(n: int) -> bytes:
    """MQTT's variable-length integer."""
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _packets(buffer: bytearray):
    """Yield (first byte, body) for every whole packet at the front of ``buffer`` and drop them."""
    offset = 0
    while len(buffer) - offset >= 2:
        n, multiplier, i = 0, 1, offset + 1
        while i < len(buffer):
            digit = buffer[i]
            n += (digit & 127) * multiplier
            multiplier *= 128
            i += 1
            if not digit & 128:
                break
        else:
            break
        if buffer[i - 1] & 128 or len(buffer) < i + n:
            break
        yield buffer[offset], bytes(buffer[i:i + n])
        offset = i + n
    del buffer[:offset]


class Generator:
    """One connection to the broker that publishes requests and reads their answers."""

    def __init__(self, port: int, request_topic: str, answer_topic: str, template: dict, qos: int, client_id: str):
        self.qos, self.template, self.counter = qos, template, 0
        self.topic = _string(request_topic)
        self.sent: dict[bytes, float] = {}
        self.latencies: list[float] = []
        self.errors = 0
        self.lost = 0
        self.buffer = bytearray()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # clean session, keepalive 0 (none: a run lasts seconds)
        connect = _string("MQTT") + bytes([4, 2]) + struct.pack("!H", 0) + _string(client_id)
        self.sock.sendall(bytes([0x10]) + _length(len(connect)) + connect)
        subscribe = struct.pack("!H", 1) + _string(answer_topic) + bytes([qos])
        self.sock.sendall(bytes([0x82]) + _length(len(subscribe)) + subscribe)
        for first, body in self._until({0x20, 0x90}):
            if first == 0x20 and body[1:2] != b"\x00":
                raise SystemExit(f"the broker refused the connection (CONNACK code {body[1]})")
            if first == 0x90 and 0x80 in body[2:]:
                raise SystemExit(f"the broker refused the subscription to {answer_topic}")

    def _until(self, kinds: set[int]) -> list[tuple[int, bytes]]:
        """Read until one packet of each type in ``kinds`` arrived; those packets."""
        seen = []
        while kinds - {first & 0xF0 for first, _ in seen}:
            seen += [(first & 0xF0, body) for first, body in self._read() if first & 0xF0 in kinds]
        return seen

    def _read(self):
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the broker closed the connection")
        self.buffer += data
        return list(_packets(self.buffer))

    def request(self) -> bytes:
        """The next request as one PUBLISH packet."""
        self.counter += 1
        request_id = str(self.counter).encode()
        self.sent[request_id] = time.perf_counter()
        payload = json.dumps({**self.template, "id": request_id.decode()}).encode()
        header = self.topic + (struct.pack("!H", self.counter % 65535 + 1) if self.qos else b"")
        return bytes([0x30 | (self.qos << 1)]) + _length(len(header) + len(payload)) + header + payload

    def run(self, in_flight: int, seconds: float, measure: bool) -> None:
        """Keep ``in_flight`` requests outstanding for ``seconds``; record latencies when ``measure``."""
        self.sock.sendall(b"".join(self.request() for _ in range(in_flight - len(self.sent))))
        stop = time.perf_counter() + seconds
        checked = time.perf_counter()
        while time.perf_counter() < stop:
            out = []
            if time.perf_counter() - checked > 0.5:
                # a request unanswered for 2 s is lost (a QoS 0 drop, a reconnect): counted and replaced
                checked = time.perf_counter()
                for request_id in [k for k, began in self.sent.items() if checked - began > 2.0]:
                    del self.sent[request_id]
                    self.lost += measure
                    out.append(self.request())
            for first, body in self._read():
                if first >> 4 != 3:  # PUBACKs of our requests and anything else carry nothing to count
                    continue
                start = 2 + struct.unpack_from("!H", body)[0]
                if first & 0x06:  # an answer at QoS 1 is acknowledged
                    out.append(b"\x40\x02" + body[start:start + 2])
                    start += 2
                found = ANSWER_ID.search(body, start)
                began = self.sent.pop(found.group(1), None) if found else None
                if began is None:
                    continue
                if measure:
                    if b'"outputs"' in body:
                        self.latencies.append(time.perf_counter() - began)
                    else:
                        self.errors += 1
                out.append(self.request())
            if out:
                self.sock.sendall(b"".join(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--request-topic", required=True)
    parser.add_argument("--answer-topic", required=True)
    parser.add_argument("--body", required=True, help="a JSON file: the OIP request (an id is added to each)")
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--client-id", default="bench-load")
    parser.add_argument("--cpu-of", type=int, help="also report this process's CPU per answer (the agent's pid)")
    args = parser.parse_args()
    with open(args.body, "rb") as f:
        template = json.load(f)
    generator = Generator(args.port, args.request_topic, args.answer_topic, template, args.qos, args.client_id)
    # the agent may still be subscribing: one request at a time until one is answered
    deadline = time.monotonic() + 30
    while not generator.latencies and time.monotonic() < deadline:
        generator.sent.clear()
        generator.sock.settimeout(1.0)
        try:
            generator.run(1, 1.0, measure=True)
        except TimeoutError:
            pass
    if not generator.latencies:
        raise SystemExit("no answer within 30 s: is the agent streaming on this topic?")
    generator.sock.settimeout(10)
    generator.run(args.in_flight, args.warmup, measure=False)
    generator.latencies, generator.errors, generator.lost = [], 0, 0
    other = _process_cpu(args.cpu_of) if args.cpu_of else 0.0
    began, cpu = time.perf_counter(), time.process_time()
    generator.run(args.in_flight, args.duration, measure=True)
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    other = _process_cpu(args.cpu_of) - other if args.cpu_of else None
    latencies = np.sort(np.asarray(generator.latencies)) * 1000
    if not len(latencies):
        raise SystemExit(f"no answer with outputs in {args.duration} s ({generator.errors} errors, {generator.lost} lost)")
    print(json.dumps({"answers": len(latencies), "rps": len(latencies) / elapsed, "errors": generator.errors,
                      "lost": generator.lost, "p50": float(np.percentile(latencies, 50)),
                      "p99": float(np.percentile(latencies, 99)),
                      "generator_cpu_us": cpu / max(1, len(latencies)) * 1e6,
                      "cpu_us": other / max(1, len(latencies)) * 1e6 if other is not None else None}))


if __name__ == "__main__":
    main()
