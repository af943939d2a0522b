"""Benchmark: the agent's serving path against raw ONNX Runtime and the tutorial FastAPI endpoint.

    python benchmarks/serving.py [--duration 8] [--rounds 1] [--size 224]

One MobileNetV2-style CNN (random weights; speed does not depend on them), input 1x3xSIZExSIZE,
converted with `edgepack convert --profile x86-64 --recipe onnx-fp32`, 2 intra-op threads everywhere.

(a) in process, concurrency 1/8/32 (threads): agent ``LoadedModel.predict`` vs raw ``session.run``
    target: overhead <= 5%
(b) over HTTP, concurrency 1/8/32 (wrk connections, keep-alive, a Lua body):
    the FastAPI baseline (../shared/baselines/seed_fastapi_server.py, JSON) vs the agent with JSON,
    binary tensors unbatched, and binary tensors with dynamic batching
    targets: agent JSON >= 1.0x baseline; binary >= 3x baseline; batching >= 1.5x unbatched at
    concurrency 32 with p95 <= 1.3x
(c) idle RSS of the agent daemon vs a bare Python process that loads the model with onnxruntime
    (target <= 1.3x), and cold start to the first answered request (target <= 2 s).
(d) the dataplane's targets, every agent with its default config (only threads: 2 set): HTTP binary
    at c=1 and c=8 (wrk) vs raw session.run in process at 1 and 8 threads; gRPC through
    tritonclient.grpc at c=8 vs the same raw figure and vs HTTP binary through tritonclient.http (the
    same kind of client, in another process), and gRPC loaded by h2load (a C HTTP/2 generator, as wrk
    is for HTTP/1.1; gRPC calls are HTTP/2 POSTs) at c=1 and c=8 vs raw and vs wrk's rows; HTTP JSON at c=8 vs the FastAPI baseline and its
    refusals; MQTT streaming of ~1 KB requests vs HTTP JSON on the same small model (needs mosquitto),
    loaded by benchmarks/mqtt_load.py (a raw-socket client in another process, as wrk is for HTTP) and,
    for comparison, by a paho client in Python.
Needs wrk (Debian package "wrk"); the h2load rows need h2load (Debian package "nghttp2-client").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
BASELINE = ROOT.parent / "shared" / "baselines" / "seed_fastapi_server.py"
CONCURRENCY = (1, 8, 32)
THREADS = 2

WRK_SCRIPT = r"""
local f = io.open(os.getenv("BODY_FILE"), "rb"); wrk.body = f:read("*a"); f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE")
local hl = os.getenv("HEADER_LENGTH")
if hl and hl ~= "" then wrk.headers["Inference-Header-Content-Length"] = hl end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %d, "duration_us": %d, "errors": %d, "non2xx": %d, ' ..
    '"p50": %d, "p95": %d, "p99": %d}\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def build_bundle(work: Path, size: int) -> tuple[Path, Path]:
    """Export the CNN, convert it to an fp32 bundle; return (bundle, extracted model.onnx)."""
    import torch

    from converters.pipeline import ConvertOptions, convert
    from edgepack.bundle import open_bundle
    from mobilenet import mobilenet

    torch.manual_seed(0)
    model = mobilenet().eval()
    example = torch.randn(2, 3, size, size)  # batch 1 would specialise the batch dimension
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    torch.export.save(program, str(work / "cnn.pt2"))
    np.save(work / "calibration.npy", np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32))
    (result,) = convert(ConvertOptions(model=str(work / "cnn.pt2"), profiles=["x86-64"], out=work, recipes=["onnx-fp32"],
                                       calibration=str(work / "calibration.npy"), name="cnn", version="1.0.0"))
    if not result.bundle:
        raise SystemExit(f"conversion failed: {result.error}")
    with open_bundle(result.bundle) as bundle:
        (work / "model.onnx").write_bytes(bundle.read_file(bundle.manifest["model_file"]))
    return result.bundle, work / "model.onnx"


# -- (a) in process ---------------------------------------------------------------------------------

def closed_loop(call, concurrency: int, duration: float) -> tuple[float, float]:
    """Requests/s and p50 ms of ``call`` from ``concurrency`` threads for ``duration`` s."""
    latencies: list[float] = []
    stop = time.perf_counter() + duration

    def worker():
        local = []
        while time.perf_counter() < stop:
            start = time.perf_counter()
            call()
            local.append(time.perf_counter() - start)
        latencies.extend(local)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / (time.perf_counter() - began), statistics.median(latencies) * 1000


def in_process(bundle: Path, onnx_path: Path, sample: np.ndarray, duration: float, rounds: int) -> list[dict]:
    import onnxruntime as ort

    from agent.model import load_model
    from edgepack.bundle import open_bundle

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    folder = Path(tempfile.mkdtemp())
    with open_bundle(bundle) as opened:
        opened.extract_to(folder)
        model = load_model(folder, opened.manifest, THREADS)
    feeds = {"input": sample}
    calls = {"raw session.run": lambda: session.run(None, feeds), "agent predict": lambda: model.predict(feeds)}
    for call in calls.values():
        for _ in range(20):
            call()
    rows = []
    for concurrency in CONCURRENCY:
        measured = {name: [] for name in calls}
        for _ in range(rounds * 3):  # short interleaved runs: drift hits both alike
            for name, call in calls.items():
                measured[name].append(closed_loop(call, concurrency, duration / 3))
        raw = statistics.median(r for r, _ in measured["raw session.run"])
        agent = statistics.median(r for r, _ in measured["agent predict"])
        rows.append({"concurrency": concurrency, "raw_rps": raw, "agent_rps": agent,
                     "raw_p50": statistics.median(p for _, p in measured["raw session.run"]),
                     "agent_p50": statistics.median(p for _, p in measured["agent predict"]),
                     "overhead": 1 - agent / raw})
    model.close()
    shutil.rmtree(folder, ignore_errors=True)
    return rows


# -- (b) HTTP ---------------------------------------------------------------------------------------

def cpu_flags() -> str:
    """The CPU model and the SIMD flags that decide kernel speed (ratios only compare within one run)."""
    text = Path("/proc/cpuinfo").read_text()
    flags = next((set(l.split(":", 1)[1].split()) for l in text.splitlines() if l.startswith("flags")), set())
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "?")
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "f16c", "amx_int8"]
    return f"{model}; {os.cpu_count()} cores; flags: " + " ".join(f for f in wanted if f in flags)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 60, body: bytes | None = None, headers=None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(url, data=body, headers=headers or {})
            with urllib.request.urlopen(request, timeout=30) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


class Server:
    """A server subprocess on a free port."""

    def __init__(self, args: list[str], ready_path: str, cwd=ROOT, cpus: set[int] | None = None):
        self.port = free_port()
        self.process = subprocess.Popen([*args, "--port", str(self.port)], cwd=cwd, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL,
                                        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_http(self.url + ready_path)

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmRSS"))) / 1024

    def cpu_seconds(self) -> float:
        """CPU time the server process has used (user + system, all its threads)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def default_agent(bundle: Path, work: Path, name: str = "cnn", extra: str = "", args: list[str] = ()) -> Server:
    """The agent with its default serving config (only the model's threads set, as raw's)."""
    config = work / f"agent-default-{name}.yaml"
    config.write_text(f"store: {work / 'store'}\nlog_level: warning\nmodels:\n  - name: {name}\n    threads: {THREADS}\n{extra}")
    return Server([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--bundle", str(bundle), *args],
                  "/v2/health/ready")


def agent_server(bundle: Path, work: Path, batching: bool, max_batch: int) -> Server:
    config = work / f"agent-{batching}.yaml"
    # The default queue (at least 32 requests) and large-body budget: a closed loop of up to 32 clients is
    # never refused; admission under overload is what benchmarks/overload.py measures.
    config.write_text(f"store: {work / 'store'}\nlog_level: warning\n"
                      f"models:\n  - name: cnn\n    threads: {THREADS}\n"
                      f"    batching: {{enabled: {str(batching).lower()}, max_batch_size: {max_batch}, max_queue_delay_ms: 0}}\n")
    return Server([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--bundle", str(bundle)],
                  "/v2/health/ready")


def wrk(url: str, body_file: Path, content_type: str, header_length: str, concurrency: int, duration: float,
        script: Path) -> dict:
    env = {**os.environ, "BODY_FILE": str(body_file), "CONTENT_TYPE": content_type, "HEADER_LENGTH": header_length}
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "60s", "-s", str(script), url],
                         capture_output=True, text=True, env=env, timeout=duration + 120)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    data = json.loads(line[len("RESULT "):])
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    return data


def binary_body(sample: np.ndarray) -> tuple[bytes, int]:
    """An OIP request with the binary tensor extension, and its JSON header length."""
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(sample.shape),
                                     "parameters": {"binary_data_size": sample.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + sample.tobytes(), len(header)


def http_rows(bundle: Path, onnx_path: Path, sample: np.ndarray, work: Path, duration: float, rounds: int, max_batch: int) -> list[dict]:
    script = work / "body.lua"
    script.write_text(WRK_SCRIPT)
    values = sample.tolist()
    (work / "baseline.json").write_text(json.dumps({"input": values}))
    flat = sample.reshape(-1).tolist()
    (work / "oip.json").write_text(json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(sample.shape), "data": flat}]}))
    body, header_length = binary_body(sample)
    (work / "oip.bin").write_bytes(body)
    setups = [
        ("FastAPI baseline, JSON", lambda: Server([sys.executable, str(BASELINE), str(onnx_path), "--threads", str(THREADS)], "/health"),
         "/predict", "baseline.json", "application/json", ""),
        ("agent, JSON", lambda: agent_server(bundle, work, False, max_batch), "/v2/models/cnn/infer", "oip.json", "application/json", ""),
        ("agent, binary", lambda: agent_server(bundle, work, False, max_batch), "/v2/models/cnn/infer", "oip.bin",
         "application/octet-stream", str(header_length)),
        (f"agent, binary + batching (max {max_batch})", lambda: agent_server(bundle, work, True, max_batch),
         "/v2/models/cnn/infer", "oip.bin", "application/octet-stream", str(header_length)),
    ]
    rows = []
    for label, start, path, body, content_type, header_length in setups:
        server = start()
        try:
            for concurrency in CONCURRENCY:
                wrk(server.url + path, work / body, content_type, header_length, concurrency, 2, script)  # warm-up
                runs = [wrk(server.url + path, work / body, content_type, header_length, concurrency, duration, script)
                        for _ in range(rounds)]
                best = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
                rows.append({"server": label, "concurrency": concurrency, **best})
                print(f"  {label:40s} c={concurrency:<3d} {best['rps']:8.1f} req/s  p50 {best['p50']/1000:7.1f} ms  "
                      f"p95 {best['p95']/1000:7.1f} ms  errors {best['errors'] + best['non2xx']}", flush=True)
        finally:
            server.stop()
    return rows


# -- (c) memory and cold start ----------------------------------------------------------------------

BARE = """
import sys, time, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 2
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
s.run(None, {"input": np.load(sys.argv[2])})
print("ready", flush=True); time.sleep(600)
"""


def memory_and_cold_start(bundle: Path, onnx_path: Path, sample: np.ndarray, work: Path) -> dict:
    np.save(work / "sample.npy", sample)
    bare = subprocess.Popen([sys.executable, "-c", BARE, str(onnx_path), str(work / "sample.npy")], stdout=subprocess.PIPE, text=True)
    bare.stdout.readline()
    time.sleep(1)
    bare_rss = int(next(l.split()[1] for l in Path(f"/proc/{bare.pid}/status").read_text().splitlines() if l.startswith("VmRSS"))) / 1024
    bare.kill()
    body, header_len = binary_body(sample)
    starts, agent_rss = [], []
    for _ in range(3):
        port = free_port()
        began = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--bundle", str(bundle), "--port", str(port),
                                    "--store", str(work / "store")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{port}/v2/models/cnn/infer", body=body,
                  headers={"Inference-Header-Content-Length": str(header_len), "Content-Type": "application/octet-stream"})
        starts.append(time.perf_counter() - began)
        time.sleep(1)
        agent_rss.append(int(next(l.split()[1] for l in Path(f"/proc/{process.pid}/status").read_text().splitlines()
                                  if l.startswith("VmRSS"))) / 1024)
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    return {"bare_rss_mb": bare_rss, "agent_rss_mb": statistics.median(agent_rss), "cold_start_s": statistics.median(starts)}


# -- (d) the dataplane's targets ----------------------------------------------------------------------

CLIENT_LOAD = r"""
import json, sys, threading, time
import numpy as np
kind, address, model, seconds, concurrency, sample_path = sys.argv[1:7]
seconds, concurrency = float(seconds), int(concurrency)
sample = np.load(sample_path)
if kind == "grpc":
    import tritonclient.grpc as triton
else:
    import tritonclient.http as triton
def caller():
    client = triton.InferenceServerClient(address)
    tensor = triton.InferInput("input", list(sample.shape), "FP32")
    if kind == "grpc":
        tensor.set_data_from_numpy(sample)
        return lambda: client.infer(model, [tensor])
    tensor.set_data_from_numpy(sample, binary_data=True)
    name = client.get_model_metadata(model)["outputs"][0]["name"]
    outputs = [triton.InferRequestedOutput(name, binary_data=True)]
    return lambda: client.infer(model, [tensor], outputs=outputs)
# Each thread makes its own client: tritonclient.http's connection pool is bound to the thread that
# made it (geventhttpclient's hub), and calling it from another fails its first request.
latencies, errors = [], [0]
ready = threading.Barrier(concurrency + 1)
stop = [0.0]
def worker():
    call = caller()
    for _ in range(5):
        call()
    ready.wait()
    local = []
    while time.perf_counter() < stop[0]:
        began = time.perf_counter()
        try:
            call()
            local.append(time.perf_counter() - began)
        except Exception:
            errors[0] += 1
    latencies.extend(local)
threads = [threading.Thread(target=worker) for _ in range(concurrency)]
for t in threads: t.start()
stop[0] = time.perf_counter() + 3600
ready.wait()
began = time.perf_counter()
stop[0] = began + seconds
for t in threads: t.join()
elapsed = time.perf_counter() - began
lat = np.sort(np.asarray(latencies)) * 1000
print(json.dumps({"rps": len(lat) / elapsed, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                  "errors": errors[0]}))
"""


def client_load(kind: str, address: str, model: str, sample: np.ndarray, work: Path, concurrency: int,
                duration: float) -> dict:
    """A closed loop of ``concurrency`` tritonclient threads (``kind``: grpc or http) in another process."""
    np.save(work / "client-sample.npy", sample)
    done = subprocess.run([sys.executable, "-c", CLIENT_LOAD, kind, address, model, str(duration), str(concurrency),
                           str(work / "client-sample.npy")], capture_output=True, text=True, timeout=duration + 300)
    if done.returncode:
        raise RuntimeError(f"the {kind} client failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def grpc_infer_body(model: str, sample: np.ndarray) -> bytes:
    """One gRPC-framed ModelInferRequest (1-byte flag, 4-byte length, message) with raw contents."""
    from agent.serving.oip_grpc import messages as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(sample.shape))
    request.raw_input_contents.append(np.ascontiguousarray(sample).tobytes())
    message = request.SerializeToString()
    return b"\0" + len(message).to_bytes(4, "big") + message


def h2load_grpc(server: Server, port: int, body_file: Path, clients: int, streams: int, duration: float,
                work: Path) -> dict:
    """A closed loop of ``clients`` HTTP/2 connections with ``streams`` calls each in flight, ModelInfer
    from h2load. A gRPC error comes as HTTP 200 with a grpc-status trailer h2load does not read, so the
    agent's own statistics must account for every call h2load saw succeed: as many successes (give or
    take the calls in flight when h2load stopped) and no failures. A call refused before it reached a
    model version (a full queue) is in neither count, and shows as successes missing."""
    def counts() -> tuple[int, int]:
        with urllib.request.urlopen(server.url + "/v2/models/cnn/stats", timeout=10) as answer:
            stats = json.loads(answer.read())["model_stats"][0]["inference_stats"]
        return stats["success"]["count"], stats["fail"]["count"]

    def h2load(seconds: int, log: Path | None) -> subprocess.CompletedProcess:
        return subprocess.run(["h2load", "-c", str(clients), "-m", str(streams), "-D", str(seconds), "-d", str(body_file),
                               *(["--log-file", str(log)] if log else []),
                               "-H", "content-type: application/grpc", "-H", "te: trailers",
                               f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"],
                              capture_output=True, text=True, timeout=seconds + 120)

    h2load(2, None)  # warm-up, apart: the measured run's counts are its own
    seconds = max(1, round(duration))
    log = work / f"h2load-c{clients}.log"
    log.unlink(missing_ok=True)  # h2load appends to its log
    before = counts()
    out = h2load(seconds, log)
    after = counts()
    done = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out.stdout)
    if out.returncode or not done or not int(done.group(1)):
        raise RuntimeError(f"h2load failed: {out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    measured = [int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines()
                if line.strip() and line.split("\t")[1] == "200"]
    succeeded = int(done.group(1))
    # h2load's "failed" already holds its errored and timed-out streams
    failed = (after[1] - before[1]) + int(done.group(2))
    agent_successes = after[0] - before[0]
    return {"rps": succeeded / seconds, "p50": float(np.percentile(measured, 50)), "failed": failed,
            "checked": succeeded <= agent_successes <= succeeded + clients * streams}


def tiny_bundle(work: Path) -> Path:
    """A small dense model (64 inputs -> 10): an OIP JSON request of one sample is about 1 KB."""
    import torch

    from converters.pipeline import ConvertOptions, convert

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()
    program = torch.export.export(model, (torch.randn(2, 64),), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    torch.export.save(program, str(work / "tiny.pt2"))
    np.save(work / "tiny-calibration.npy", np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
    (result,) = convert(ConvertOptions(model=str(work / "tiny.pt2"), profiles=["x86-64"], out=work / "tiny", recipes=["onnx-fp32"],
                                       calibration=str(work / "tiny-calibration.npy"), name="tiny", version="1.0.0"))
    if not result.bundle:
        raise SystemExit(f"conversion failed: {result.error}")
    return result.bundle


def mqtt_stream_rates(bundle: Path, work: Path, body: bytes, in_flight: int, duration: float) -> dict | None:
    """Answers/s of the agent's MQTT stream with ``in_flight`` requests outstanding, keyed by
    (generator, QoS): ``lean`` is benchmarks/mqtt_load.py (raw socket, another process, as wrk is for
    HTTP), ``paho`` a paho client in this process. None without mosquitto."""
    mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not mosquitto:
        return None
    from edgepack.fleet import topics

    port = free_port()
    (work / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 100\n"
                                         "max_queued_messages 100000\nset_tcp_nodelay true\n")
    broker = subprocess.Popen([mosquitto, "-c", str(work / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    server = default_agent(bundle, work, "tiny", f"    stream: true\n    stream_max_in_flight: {max(16, in_flight)}\n"
                           f"device_id: bench\nmqtt: {{host: 127.0.0.1, port: {port}}}\nupdates: {{enabled: false}}\n")
    (work / "stream.json").write_bytes(body)
    request_topic, answer_topic = topics.stream("bench", "tiny", "in"), topics.stream("bench", "tiny", "out")
    rates = {}
    try:
        for qos in (1, 0):
            done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mqtt_load.py"), "--port", str(port),
                                   "--request-topic", request_topic, "--answer-topic", answer_topic,
                                   "--body", str(work / "stream.json"), "--in-flight", str(in_flight),
                                   "--duration", str(duration), "--qos", str(qos), "--cpu-of", str(server.process.pid)],
                                  capture_output=True, text=True, timeout=duration + 120)
            if done.returncode:
                raise RuntimeError(f"mqtt_load.py failed: {done.stderr[-2000:]}")
            rates[("lean", qos)] = json.loads(done.stdout.strip().splitlines()[-1])
        for qos in (1, 0):
            rates[("paho", qos)] = paho_stream_rate(server, port, request_topic, answer_topic, body, in_flight, duration, qos)
    finally:
        server.stop()
        broker.terminate()
        broker.wait(10)
    return rates


def paho_stream_rate(server: Server, port: int, request_topic: str, answer_topic: str, body: bytes, in_flight: int,
                     duration: float, qos: int) -> dict:
    """The same closed loop from a paho client in this process (what a Python user's client costs)."""
    import paho.mqtt.client as mqtt

    from edgepack.fleet.nodelay import no_delay

    answered: list[float] = []
    sent: dict[str, float] = {}
    ready = threading.Semaphore(0)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-paho", protocol=mqtt.MQTTv5)

    def on_message(c, userdata, message):
        reply = json.loads(message.payload)
        began = sent.pop(reply.get("id"), None)
        if began is not None and "outputs" in reply:
            answered.append(time.perf_counter() - began)
        ready.release()

    client.on_message = on_message
    client.on_socket_open = no_delay
    try:
        client.connect("127.0.0.1", port)
        client.subscribe(answer_topic, 1)
        client.loop_start()
        time.sleep(1.0)
        template = json.loads(body)
        counter = 0

        def send():
            nonlocal counter
            counter += 1
            request_id = str(counter)
            sent[request_id] = time.perf_counter()
            client.publish(request_topic, json.dumps({**template, "id": request_id}), qos=qos)

        for _ in range(in_flight):
            send()
        stop = time.perf_counter() + duration
        began, cpu_before = time.perf_counter(), server.cpu_seconds()
        while time.perf_counter() < stop:
            if ready.acquire(timeout=5):
                send()
        elapsed, cpu = time.perf_counter() - began, server.cpu_seconds() - cpu_before
        return {"rps": len(answered) / elapsed, "p50": statistics.median(answered) * 1000 if answered else float("nan"),
                "cpu_us": cpu / max(1, len(answered)) * 1e6}
    finally:
        client.loop_stop()
        client.disconnect()


def dataplane_targets(bundle: Path, onnx_path: Path, sample: np.ndarray, work: Path, duration: float,
                      baseline_json_c8: float | None) -> None:
    import onnxruntime as ort

    script = work / "body.lua"
    script.write_text(WRK_SCRIPT)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    feeds = {"input": sample}
    for _ in range(20):
        session.run(None, feeds)
    run = session.run
    raw = {c: closed_loop(lambda: run(None, feeds), c, duration) for c in (1, 8)}
    # the daemon's ONNX Runtime threads do not spin by default (server.intra_op_spinning): the same
    # without spinning separates what that costs from what the HTTP path costs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    quiet = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"]).run
    for _ in range(20):
        quiet(None, feeds)
    raw_quiet = closed_loop(lambda: quiet(None, feeds), 1, duration)
    # the session stays loaded: 2 threads idle while the agent is measured
    body, header_length = binary_body(sample)
    (work / "oip.bin").write_bytes(body)
    (work / "oip.json").write_text(json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(sample.shape),
                                                           "data": sample.reshape(-1).tolist()}]}))
    grpc_port = free_port()
    server = default_agent(bundle, work, args=["--grpc-port", str(grpc_port)])
    rows = []
    try:
        url = server.url + "/v2/models/cnn/infer"
        measured = {}
        for label, file, content_type, length in [("binary", "oip.bin", "application/octet-stream", str(header_length)),
                                                  ("JSON", "oip.json", "application/json", "")]:
            for c in (1, 8):
                wrk(url, work / file, content_type, length, c, 2, script)  # warm-up
                measured[(label, c)] = wrk(url, work / file, content_type, length, c, duration, script)
        grpc_c8 = client_load("grpc", f"127.0.0.1:{grpc_port}", "cnn", sample, work, 8, duration)
        h2 = {}
        if shutil.which("h2load"):
            (work / "grpc.bin").write_bytes(grpc_infer_body("cnn", sample))
            for clients in (1, 8):
                h2[clients] = h2load_grpc(server, grpc_port, work / "grpc.bin", clients, 1, duration, work)
        http_client_c8 = client_load("http", f"127.0.0.1:{server.port}", "cnn", sample, work, 8, duration)
    finally:
        server.stop()
    server = default_agent(bundle, work, extra="server:\n  intra_op_spinning: true\n")
    try:
        url = server.url + "/v2/models/cnn/infer"
        spinning = {}
        for c in (1, 8):
            wrk(url, work / "oip.bin", "application/octet-stream", str(header_length), c, 2, script)
            spinning[c] = wrk(url, work / "oip.bin", "application/octet-stream", str(header_length), c, duration, script)
    finally:
        server.stop()
    print(f"raw c=1 {raw[1]}, raw c=8 {raw[8]}, wrk {measured}, grpc {grpc_c8}, tritonclient.http {http_client_c8}, h2load {h2}", flush=True)
    b1, b8, j8 = measured[("binary", 1)], measured[("binary", 8)], measured[("JSON", 8)]
    rows.append(("HTTP binary c=1 (wrk)", f"{b1['rps']:.1f} req/s, p50 {b1['p50']/1000:.2f} ms",
                 f"raw session.run c=1: {raw[1][0]:.1f} req/s, p50 {raw[1][1]:.2f} ms",
                 f"{b1['rps']/raw[1][0]:.2f}x, p50 +{b1['p50']/1000 - raw[1][1]:.2f} ms", ">= 0.92x, p50 +<= 0.6 ms"))
    rows.append(("  the same, raw without spinning (the daemon's default)", "", f"raw c=1, no spinning: {raw_quiet[0]:.1f} req/s, "
                 f"p50 {raw_quiet[1]:.2f} ms", f"{b1['rps']/raw_quiet[0]:.2f}x, p50 +{b1['p50']/1000 - raw_quiet[1]:.2f} ms", ""))
    rows.append(("  HTTP binary c=1, server.intra_op_spinning: true", f"{spinning[1]['rps']:.1f} req/s, p50 {spinning[1]['p50']/1000:.2f} ms",
                 f"raw c=1: {raw[1][0]:.1f} req/s", f"{spinning[1]['rps']/raw[1][0]:.2f}x, p50 +{spinning[1]['p50']/1000 - raw[1][1]:.2f} ms",
                 ">= 0.92x"))
    rows.append(("HTTP binary c=8 (wrk), default config", f"{b8['rps']:.1f} req/s, {b8['non2xx']} refused",
                 f"raw session.run, 8 threads: {raw[8][0]:.1f} req/s", f"{b8['rps']/raw[8][0]:.2f}x", ">= 0.95x"))
    rows.append(("  HTTP binary c=8, server.intra_op_spinning: true", f"{spinning[8]['rps']:.1f} req/s",
                 f"raw, 8 threads: {raw[8][0]:.1f} req/s", f"{spinning[8]['rps']/raw[8][0]:.2f}x", ">= 0.95x"))
    rows.append(("gRPC c=8 (tritonclient.grpc), default config", f"{grpc_c8['rps']:.1f} req/s, p50 {grpc_c8['p50']:.1f} ms, "
                 f"{grpc_c8['errors']} errors", f"raw: {raw[8][0]:.1f} req/s", f"{grpc_c8['rps']/raw[8][0]:.2f}x", ">= 0.95x"))
    rows.append(("gRPC c=8 vs HTTP binary c=8, both tritonclient", f"{grpc_c8['rps']:.1f} req/s",
                 f"tritonclient.http: {http_client_c8['rps']:.1f} req/s, p50 {http_client_c8['p50']:.1f} ms",
                 f"{grpc_c8['rps']/http_client_c8['rps']:.2f}x", ">= 1.0x"))
    rows.append(("gRPC c=8 vs HTTP binary c=8 (wrk)", f"{grpc_c8['rps']:.1f} req/s", f"{b8['rps']:.1f} req/s",
                 f"{grpc_c8['rps']/b8['rps']:.2f}x", ">= 1.0x"))
    for clients, raw_c, http in ((1, raw[1], b1), (8, raw[8], b8)):
        if clients not in h2:
            rows.append((f"gRPC c={clients} (h2load)", "not measured (no h2load: apt-get install nghttp2-client)", "", "", ""))
            continue
        measured = h2[clients]
        note = "" if measured["checked"] and not measured["failed"] else \
            f", **{measured['failed']} failed calls, the agent's count {'agrees' if measured['checked'] else 'disagrees'}: " \
            "not a valid measure**"
        rows.append((f"gRPC c={clients} (h2load, {clients} connection{'s' if clients > 1 else ''})",
                     f"{measured['rps']:.1f} req/s, p50 {measured['p50']:.2f} ms{note}",
                     f"raw session.run, {clients} thread{'s' if clients > 1 else ''}: {raw_c[0]:.1f} req/s",
                     f"{measured['rps']/raw_c[0]:.2f}x", ">= 0.95x" if clients == 8 else ""))
        rows.append((f"  gRPC c={clients} (h2load) vs HTTP binary c={clients} (wrk)", f"{measured['rps']:.1f} req/s",
                     f"{http['rps']:.1f} req/s, p50 {http['p50']/1000:.2f} ms", f"{measured['rps']/http['rps']:.2f}x",
                     ">= 1.0x" if clients == 8 else ""))
    if baseline_json_c8:
        rows.append(("HTTP JSON c=8 (wrk), default config", f"{j8['rps']:.1f} req/s, {j8['non2xx']} refused",
                     f"FastAPI baseline c=8: {baseline_json_c8:.1f} req/s", f"{j8['rps']/baseline_json_c8:.2f}x",
                     ">= 3x, 0 refused"))
    tiny = tiny_bundle(work)
    tiny_sample = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    tiny_body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                        "data": [round(float(v), 6) for v in tiny_sample.reshape(-1)]}]})
    (work / "tiny.json").write_text(tiny_body)
    server = default_agent(tiny, work, "tiny")
    try:
        wrk(server.url + "/v2/models/tiny/infer", work / "tiny.json", "application/json", "", 8, 2, script)
        cpu_before = server.cpu_seconds()
        tiny_http = wrk(server.url + "/v2/models/tiny/infer", work / "tiny.json", "application/json", "", 8, duration, script)
        tiny_http["cpu_us"] = (server.cpu_seconds() - cpu_before) / max(1, tiny_http["requests"]) * 1e6
    finally:
        server.stop()
    try:
        streamed = mqtt_stream_rates(tiny, work, tiny_body.encode(), 8, duration)
    except Exception as exc:  # noqa: BLE001 - the other rows still print
        print(f"MQTT stream not measured: {exc}")
        streamed = None
    if streamed:
        print(f"MQTT stream {streamed}", flush=True)
        http = f"HTTP JSON c=8 (wrk), same model: {tiny_http['rps']:.1f} req/s, agent CPU {tiny_http['cpu_us']:.0f} us/answer"
        for label, key, target in (
                (f"MQTT stream, {len(tiny_body)} B requests, 8 in flight, QoS 1 (mqtt_load.py)", ("lean", 1), ">= 0.8x"),
                ("  the same at QoS 0 (answers at the request's QoS)", ("lean", 0), ">= 0.8x"),
                ("  QoS 1 from a paho client in Python (its CPU beside the agent's)", ("paho", 1), ""),
                ("  QoS 0 from a paho client in Python", ("paho", 0), "")):
            measured = streamed[key]
            generator = f", generator {measured['generator_cpu_us']:.0f} us/answer" if "generator_cpu_us" in measured else ""
            if measured.get("errors") or measured.get("lost"):  # a ratio of refusals would flatter the row
                generator += f", **{measured['errors']} errors, {measured['lost']} lost: not a valid measure**"
            rows.append((label, f"{measured['rps']:.1f} req/s, p50 {measured['p50']:.1f} ms, agent CPU {measured['cpu_us']:.0f} us/answer"
                         f"{generator}", http, f"{measured['rps']/tiny_http['rps']:.2f}x", target))
    else:
        rows.append(("MQTT stream", "not measured (no mosquitto)", "", "", ">= 0.8x"))
    print("| measure | agent | baseline in the same run | ratio | target |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=1, help="repeat each HTTP measurement, report the median")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--only-dataplane", action="store_true", help="only (d), with the FastAPI baseline's JSON c=8")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    work = Path(tempfile.mkdtemp(prefix="edgepack-serving-"))
    bundle, onnx_path = build_bundle(work, args.size)
    sample = np.random.default_rng(1).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    print(f"CPU: {cpu_flags()}")
    if args.only_dataplane:
        script = work / "body.lua"
        script.write_text(WRK_SCRIPT)
        (work / "baseline.json").write_text(json.dumps({"input": sample.tolist()}))
        baseline = Server([sys.executable, str(BASELINE), str(onnx_path), "--threads", str(THREADS)], "/health")
        try:
            wrk(baseline.url + "/predict", work / "baseline.json", "application/json", "", 8, 2, script)
            base8 = wrk(baseline.url + "/predict", work / "baseline.json", "application/json", "", 8, args.duration, script)["rps"]
        finally:
            baseline.stop()
        print(f"\n(d) the dataplane's targets ({args.duration:.0f} s per point)", flush=True)
        dataplane_targets(bundle, onnx_path, sample, work, args.duration, base8)
        shutil.rmtree(work, ignore_errors=True)
        return

    print(f"\n(a) in process, batch 1, {THREADS} threads, input {list(sample.shape)}", flush=True)
    rows_a = [] if args.skip_in_process else in_process(bundle, onnx_path, sample, args.duration, args.rounds)
    print("| concurrency | raw session.run req/s | agent predict req/s | raw p50 ms | agent p50 ms | overhead |")
    print("|---|---|---|---|---|---|")
    for r in rows_a:
        print(f"| {r['concurrency']} | {r['raw_rps']:.1f} | {r['agent_rps']:.1f} | {r['raw_p50']:.2f} | {r['agent_p50']:.2f} | {r['overhead']*100:+.1f}% |")

    print(f"\n(b) over HTTP (wrk, {args.duration:.0f} s per point)", flush=True)
    rows_b = http_rows(bundle, onnx_path, sample, work, args.duration, args.rounds, args.max_batch)
    base = {r["concurrency"]: r["rps"] for r in rows_b if r["server"].startswith("FastAPI")}
    unbatched = {r["concurrency"]: r for r in rows_b if r["server"] == "agent, binary"}
    print("| server | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors | vs baseline | vs agent unbatched |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows_b:
        c = r["concurrency"]
        print(f"| {r['server']} | {c} | {r['rps']:.1f} | {r['p50']/1000:.1f} | {r['p95']/1000:.1f} | {r['p99']/1000:.1f} | "
              f"{r['errors'] + r['non2xx']} | {r['rps']/base[c]:.2f}x | {r['rps']/unbatched[c]['rps']:.2f}x |")
    batched32 = next(r for r in rows_b if "batching" in r["server"] and r["concurrency"] == 32)
    print(f"batching at concurrency 32: {batched32['rps']/unbatched[32]['rps']:.2f}x throughput, "
          f"p95 {batched32['p95']/unbatched[32]['p95']:.2f}x of unbatched")

    print("\n(c) memory and cold start", flush=True)
    c = memory_and_cold_start(bundle, onnx_path, sample, work)
    print("| measure | agent | bare onnxruntime process | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| idle RSS after one inference | {c['agent_rss_mb']:.1f} MB | {c['bare_rss_mb']:.1f} MB | "
          f"{c['agent_rss_mb']/c['bare_rss_mb']:.2f}x | <= 1.3x |")
    print(f"| cold start to first answered request | {c['cold_start_s']:.2f} s | | | <= 2 s |")

    print(f"\n(d) the dataplane's targets ({args.duration:.0f} s per point)", flush=True)
    dataplane_targets(bundle, onnx_path, sample, work, args.duration, base.get(8))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
