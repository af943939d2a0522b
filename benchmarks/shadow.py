"""Benchmark: answer latency with a candidate in shadow vs without, at the same load; the agreement the
daemon reports vs an offline comparison of the two bundles on the same inputs.

    python benchmarks/shadow.py [--duration 10] [--clients 4] [--cpu-share 0.25]

The digits CNN of examples/ converted twice (fp32 1.0.0 active, static int8 2.0.0 candidate). Each run
starts `edgepack-agent run --bundle fp32` (with and without `--config` naming the int8 bundle in
shadow), and CLIENTS closed-loop HTTP clients send one validation image per request for DURATION s.
Target: p50 and p99 with the shadow within 10% of without (the shadow's queue drops instead).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
from overload import cpu_flags  # noqa: E402


def _bundles(folder: Path):
    import digits_cnn
    from converters.pipeline import ConvertOptions, convert

    digits_cnn.main(folder)
    common = dict(model=str(folder / "digits_cnn.pt2"), out=folder / "bundles", calibration=str(folder / "calibration.npz"),
                  validation=str(folder / "validation.npz"), name="digits", profiles=["x86-64"])
    (fp32,) = convert(ConvertOptions(recipes=["onnx-fp32"], version="1.0.0", **common))
    (int8,) = convert(ConvertOptions(recipes=["onnx-int8-static"], version="2.0.0", **common))
    with np.load(folder / "validation.npz") as data:
        images = data["input"].astype(np.float32)
    return fp32.bundle, int8.bundle, images


def _load(url: str, images: np.ndarray, clients: int, duration: float) -> list[float]:
    import httpx

    latencies: list[float] = []
    stop = time.monotonic() + duration
    bodies = [{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                           "data": image.ravel().tolist()}]} for image in images]

    def client(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            index = offset
            while time.monotonic() < stop:
                began = time.perf_counter()
                answer = http.post("/v2/models/digits/infer", json=bodies[index % len(bodies)])
                latencies.append(time.perf_counter() - began)
                assert answer.status_code == 200, answer.text
                index += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def _pct(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    import httpx
    import yaml

    from converters.gate import compare_output
    from tests.integration.daemon import Daemon

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--cpu-share", type=float, default=0.25)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="shadow-bench-"))
    active, candidate, images = _bundles(folder)
    config = folder / "agent.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "digits", "threads": 1, "shadow": {
        "bundle": str(candidate), "cpu_share": args.cpu_share}}]}))
    plain = folder / "plain.yaml"
    plain.write_text(yaml.safe_dump({"models": [{"name": "digits", "threads": 1}]}))
    rows, report = [], None
    for label, path in (("without shadow", plain), ("with shadow", config), ("without shadow (again)", plain)):
        with Daemon("--config", path, "--bundle", active) as daemon:
            _load(daemon.url, images[:50], args.clients, 1.0)  # warm-up
            latencies = _load(daemon.url, images, args.clients, args.duration)
            if "shadow" in label and "without" not in label:
                report = httpx.get(f"{daemon.url}/v2/models/digits/shadow").json()
            daemon.stop()
        rows.append((label, len(latencies) / args.duration, _pct(latencies, 0.5), _pct(latencies, 0.99)))
    base_p50 = (rows[0][2] + rows[2][2]) / 2
    base_p99 = (rows[0][3] + rows[2][3]) / 2
    print(f"CPU: {cpu_flags()}")
    print(f"\n{args.clients} closed-loop HTTP JSON clients, {args.duration:g} s, digits CNN 1x1x8x8, active fp32 (1 thread), "
          f"shadow int8 (cpu_share {args.cpu_share})\n")
    print("| run | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for label, rate, p50, p99 in rows:
        print(f"| {label} | {rate:.1f} | {p50 * 1e3:.2f} | {p99 * 1e3:.2f} |")
    with_p50, with_p99 = rows[1][2], rows[1][3]
    print(f"\nwith/without: p50 {with_p50 / base_p50:.3f}x, p99 {with_p99 / base_p99:.3f}x (target <= 1.10x)")
    print(f"shadow requests: {report['requests']}, cpu_share used {report['cpu_share']}")
    # The offline comparison on the inputs the shadow compared is not known request by request, so it is
    # made over the whole validation set; the daemon's figure is over the sampled requests.
    import onnxruntime as ort

    from edgepack.bundle import open_bundle

    outputs = []
    for bundle in (active, candidate):
        with open_bundle(bundle) as opened:
            session = ort.InferenceSession(opened.read_file(opened.manifest["model_file"]), providers=["CPUExecutionProvider"])
        outputs.append(np.concatenate([session.run(None, {"input": images[i:i + 1]})[0] for i in range(len(images))]))
    offline = compare_output("scores", outputs[0], outputs[1])
    name = next(iter(report["outputs"]))
    figures = report["outputs"][name]
    print(f"\n| agreement | daemon (shadow, {figures['samples']} samples) | offline (all {len(images)}) |")
    print("|---|---|---|")
    print(f"| top-1 | {figures['top1_agreement']:.4f} | {offline.top1_agreement:.4f} |")
    print(f"| confident | {figures.get('confident_agreement', float('nan')):.4f} | {offline.confident_agreement:.4f} |")
    print(f"| cosine | {figures['cosine']:.5f} | {offline.cosine:.5f} |")


if __name__ == "__main__":
    main()
