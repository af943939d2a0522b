"""Soak: the agent daemon under 10 minutes of mixed valid, malformed and oversized traffic, with a
model swap every 30 s. Not a CI test (it takes minutes); run it on demand.

    python benchmarks/soak.py [--minutes 10] [--swap-every 30] [--clients 6]

Reports requests served by status, the 5xx count (target 0), failed swaps, and RSS drift of the
daemon (first sample after warm-up vs the last; target within 10%).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from overload import cpu_flags  # noqa: E402
from serving import Server  # noqa: E402


def bundles(work: Path) -> tuple[Path, Path]:
    import digits_cnn

    from converters.pipeline import ConvertOptions, convert

    digits_cnn.main(work)
    common = dict(model=str(work / "digits_cnn.pt2"), out=work / "bundles", calibration=str(work / "calibration.npz"),
                  validation=str(work / "validation.npz"), name="digits")
    (first,) = convert(ConvertOptions(profiles=["x86-64"], recipes=["onnx-fp32"], version="1.0.0", **common))
    (second,) = convert(ConvertOptions(profiles=["rpi4"], recipes=["onnx-int8-static"], version="2.0.0", **common))
    return first.bundle, second.bundle


def requests_mix(images: np.ndarray, rng: random.Random):
    """(kind, body bytes, headers) of one request of a random kind."""
    kind = rng.choice(["json", "binary", "binary", "garbage", "bad-shape", "deep", "oversized", "nan", "bytes-mismatch"])
    rows = images[rng.randrange(0, len(images) - 8):][: rng.randint(1, 8)]
    if kind == "json":
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}]}
        return kind, json.dumps(body).encode(), {"Content-Type": "application/json"}
    if kind == "binary":
        header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape),
                                         "parameters": {"binary_data_size": rows.nbytes}}]}).encode()
        return kind, header + rows.tobytes(), {"Inference-Header-Content-Length": str(len(header))}
    if kind == "garbage":
        return kind, rng.randbytes(rng.randint(0, 2000)), {}
    if kind == "bad-shape":
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 9, 9], "data": [0.0] * 81}]}
        return kind, json.dumps(body).encode(), {}
    if kind == "deep":
        depth = rng.randint(1000, 50_000)
        return kind, b"[" * depth + b"]" * depth, {}
    if kind == "oversized":
        return kind, b" " * (64 * 2**20 + 1), {}
    if kind == "nan":
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [float("nan")] * 64}]}
        return kind, json.dumps(body).encode(), {}
    body = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [3], "data": ["a"]}]}
    return kind, json.dumps(body).encode(), {}


def main() -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--swap-every", type=float, default=30)
    parser.add_argument("--clients", type=int, default=6)
    args = parser.parse_args()
    print(f"CPU: {cpu_flags()}")
    with tempfile.TemporaryDirectory(prefix="edgepack-soak-") as temp:
        work = Path(temp)
        first, second = bundles(work)
        store = work / "store"
        agent = [sys.executable, "-m", "agent.cli"]
        subprocess.run([*agent, "install", str(first), "--store", str(store)], check=True, capture_output=True)
        (work / "agent.yaml").write_text(f"store: {store}\nlog_level: warning\n")
        server = Server([*agent, "run", "--config", str(work / "agent.yaml")], "/v2/health/ready")
        images = np.load(work / "validation.npz")["input"].astype(np.float32)
        statuses: Counter = Counter()
        by_kind: Counter = Counter()
        server_errors: list[str] = []
        stop = threading.Event()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=server.url, timeout=60) as http:
                while not stop.is_set():
                    kind, body, headers = requests_mix(images, rng)
                    try:
                        response = http.post("/v2/models/digits/infer", content=body, headers=headers)
                    except httpx.HTTPError as exc:
                        statuses[f"client error {type(exc).__name__}"] += 1
                        continue
                    statuses[response.status_code] += 1
                    by_kind[(kind, response.status_code)] += 1
                    if response.status_code >= 500 and response.status_code != 503:
                        server_errors.append(f"{kind}: {response.status_code} {response.text[:200]}")

        threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(args.clients)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        time.sleep(min(20.0, args.minutes * 6))
        rss = [(time.monotonic() - started, server.rss_mb())]
        swaps, failed_swaps, next_swap = 0, 0, time.monotonic() + args.swap_every
        while time.monotonic() - started < args.minutes * 60:
            time.sleep(1)
            if time.monotonic() >= next_swap:
                target = second if swaps % 2 == 0 else first
                done = subprocess.run([*agent, "install", str(target), "--store", str(store)], capture_output=True, text=True)
                swaps += 1
                failed_swaps += done.returncode != 0
                next_swap += args.swap_every
                rss.append((time.monotonic() - started, server.rss_mb()))
        stop.set()
        for thread in threads:
            thread.join(60)
        rss.append((time.monotonic() - started, server.rss_mb()))
        alive = server.process.poll() is None
        server.stop()
        total = sum(v for k, v in statuses.items() if isinstance(k, int))
        five = sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500 and k != 503)
        print(f"\nsoak: {args.minutes:.1f} min, {args.clients} clients, a swap every {args.swap_every:.0f} s")
        print(f"{'metric':<36} {'value':>16} {'target':>10}")
        print(f"{'requests answered':<36} {total:>16} {'':>10}")
        print(f"{'by status':<36} {json.dumps({str(k): v for k, v in sorted(statuses.items(), key=str)}):>16}")
        print(f"{'5xx (other than 503)':<36} {five:>16} {'0':>10}")
        print(f"{'swaps / failed swaps':<36} {f'{swaps} / {failed_swaps}':>16} {'- / 0':>10}")
        print(f"{'daemon alive at the end':<36} {str(alive):>16} {'True':>10}")
        drift = rss[-1][1] / rss[0][1]
        print(f"{'RSS after warm-up -> end (MB)':<36} {f'{rss[0][1]:.0f} -> {rss[-1][1]:.0f}':>16} {'':>10}")
        print(f"{'RSS drift':<36} {drift:>16.2f} {'<= 1.10':>10}")
        print("RSS samples (s, MB): " + ", ".join(f"{t:.0f}:{m:.0f}" for t, m in rss))
        print("by kind and status: " + ", ".join(f"{k}/{s}={v}" for (k, s), v in sorted(by_kind.items())))
        for line in server_errors[:5]:
            print("server error:", line)


if __name__ == "__main__":
    main()
