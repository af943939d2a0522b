"""The fleet walkthrough (run it with ``bash examples/fleet/walkthrough.sh [--quick]``).

Trains a small digits classifier (scikit-learn), converts three versions of it for two device
profiles, starts Mosquitto, the fleet controller with its dashboard, a simulated fleet of 20 devices
on x86-64 and rpi4 and one real ``edgepack-agent`` daemon fed with real digit images, then:

1. every device boots on v1 (its factory image) and the release is recorded;
2. v2, which answers differently (its predicted classes shift and it is slower), is rolled out in
   stages: the canary stage's metrics, against the devices still on v1, stop it and roll the canary
   back to v1 from the slot it still holds;
3. v3 runs in shadow on a fifth of the fleet first; it agrees with v1, so it is promoted to active,
   stage by stage, to everyone.

Without ``--quick`` it keeps everything running at the end until Ctrl-C, for the dashboard.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ("x86-64", "rpi4")
SIMULATED = [f"sim-{i:04d}" for i in range(1, 21)]


def _real_id() -> str:
    """The real agent's device id: the first pi-lab-N that v3's rollout order puts in its shadow stage
    (a stage is a hash-ranked sample of the fleet), so the walkthrough shows a real comparison too."""
    from edgepack.fleet.rollouts import _rank

    for n in range(1, 200):
        device = f"pi-lab-{n}"
        ranked = sorted(SIMULATED + [device], key=lambda d: _rank("digits@3.0.0", d))
        if ranked.index(device) < 4:
            return device
    return "pi-lab-1"


REAL = _real_id()  # the real agent daemon's device id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*args, **kwargs) -> str:
    done = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, **kwargs)
    if done.returncode:
        sys.exit(f"walkthrough: {' '.join(map(str, args[:4]))} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def edgepack(*args) -> str:
    return run(sys.executable, "-m", "edgepack.cli", *args)


def train(out: Path) -> None:
    """Three versions of a digits classifier as scikit-learn pipelines (.joblib): v1, v2 trained on
    mostly wrong labels (it answers differently), v3 trained a little longer on more data."""
    import joblib
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train_rows, test_rows = order[:1400], order[1400:]
    v1 = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=300)).fit(x[train_rows], y[train_rows])
    wrong = y[train_rows].copy()
    flip = rng.random(len(wrong)) < 0.6
    wrong[flip] = (wrong[flip] + 3) % 10  # v2: most labels moved: predictions shift
    v2 = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=300)).fit(x[train_rows], wrong)
    v3 = make_pipeline(StandardScaler(), LogisticRegression(C=0.8, max_iter=600)).fit(x[order[:1500]], y[order[:1500]])
    for version, model in (("1.0.0", v1), ("2.0.0", v2), ("3.0.0", v3)):
        joblib.dump(model, out / f"digits-{version}.joblib")
    np.save(out / "calibration.npy", x[train_rows[:200]])
    np.save(out / "test_images.npy", x[test_rows])
    agree = float((v3.predict(x[test_rows]) == v1.predict(x[test_rows])).mean())
    print(f"trained 3 versions on {len(train_rows)} digits; held-out accuracy v1 {v1.score(x[test_rows], y[test_rows]):.3f}, "
          f"v2 {v2.score(x[test_rows], y[test_rows]):.3f}, v3 {v3.score(x[test_rows], y[test_rows]):.3f}; "
          f"v3 agrees with v1 on {agree:.1%} of them")


def convert(out: Path) -> dict:
    bundles = {}
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        edgepack("convert", out / f"digits-{version}.joblib", *[a for p in PROFILES for a in ("--profile", p)],
                 "--calibration", out / "calibration.npy", "--input-shape", "input=1,64", "--name", "digits",
                 "--version", version, "--recipe", "onnx-fp32", "--key", out / "keys" / "edgepack-signing.key",
                 "--out", out / "bundles" / version)
        for profile in PROFILES:
            found = sorted((out / "bundles" / version).glob(f"*{profile}*.edgepack"))
            bundles[(version, profile)] = found[0]
    print("converted 3 versions x 2 profiles: " + ", ".join(sorted({p.name for p in bundles.values()})))
    return bundles


class Fleet:
    """Mosquitto, the controller with its dashboard, the simulator and the real agent, as processes."""

    def __init__(self, out: Path, bundles: dict, quick: bool):
        self.out, self.bundles, self.quick = out, bundles, quick
        self.processes: dict[str, subprocess.Popen] = {}
        self.db = f"sqlite:///{out / 'fleet.db'}"
        self.mqtt_port, self.dashboard_port = free_port(), int(os.environ.get("EDGEPACK_DASHBOARD_PORT") or free_port())
        self.token = os.environ.get("EDGEPACK_DASHBOARD_TOKEN") or "walkthrough-token"
        self.agent_port = None
        self._traffic = threading.Event()

    def spawn(self, name: str, *args, env: dict | None = None) -> subprocess.Popen:
        log = open(self.out / f"{name}.log", "ab")
        process = subprocess.Popen([str(a) for a in args], cwd=ROOT, stdout=log, stderr=log,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.processes[name] = process
        return process

    def start(self) -> None:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = self.out / "mosquitto.conf"
        conf.write_text(f"listener {self.mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.spawn("mosquitto", mosquitto, "-c", conf)
        self.wait(lambda: _connects(self.mqtt_port), 20, "Mosquitto")
        broker = f"mqtt://127.0.0.1:{self.mqtt_port}"
        key = self.out / "keys" / "edgepack-signing"
        self.spawn("controller", sys.executable, "-m", "edgepack.cli", "fleet", "serve", "--broker", broker, "--db", self.db,
                   "--bundles", self.out / "shelf", "--key", f"{key}.key", "--tick", "1",
                   "--dashboard", f"127.0.0.1:{self.dashboard_port}", "--dashboard-token", self.token)
        installs = [a for p in PROFILES for a in ("--install", self.bundles[("1.0.0", p)])]
        # What serving each version looks like on the simulated devices: v2's answers shift (no device
        # can tell: it serves fine; only the fleet, comparing cohorts, sees it); v3 agrees with v1 on
        # 97% of samples in shadow.
        self.spawn("simulator", sys.executable, "-m", "edgepack.cli", "fleet", "simulate", "20", "--broker", broker,
                   "--profile", ",".join(PROFILES), "--key", f"{key}.pub", *installs, "--store-root", self.out / "devices",
                   "--group", "all", "--interval", "1", "--rate", "20", "--probation-s", "1",
                   "--metrics", "default:classes=1/1/1/1/1/1/1/1/1/1,latency_ms=8",
                   "--metrics", "2.0.0:classes=4/1/1/6/1/1/1/1/1/1,latency_ms=9",
                   "--metrics", "3.0.0:latency_ms=8,agreement=0.97")
        self._start_agent(broker, key)
        self.wait(lambda: self.online() >= 21, 120, "21 devices online")
        print(f"Mosquitto on 127.0.0.1:{self.mqtt_port}; controller with its dashboard on "
              f"http://127.0.0.1:{self.dashboard_port}/; 20 simulated devices ({' and '.join(PROFILES)}) and the real "
              f"agent {REAL} (HTTP on 127.0.0.1:{self.agent_port}) online")

    def _start_agent(self, broker: str, key: Path) -> None:
        config = self.out / "agent.yaml"
        config.write_text(json.dumps({
            "device_id": REAL, "profile": "x86-64", "store": str(self.out / "agent-store"),
            "trusted_keys": [f"{key}.pub"], "fleet_keys": [f"{key}.pub"],
            "server": {"host": "127.0.0.1", "port": 0},
            "mqtt": {"host": "127.0.0.1", "port": self.mqtt_port, "reconnect_min_s": 0.2, "reconnect_max_s": 2.0},
            "telemetry": {"interval_s": 1.0},
            "updates": {"groups": ["all"], "probation_s": 2, "min_runs": 5},
        }))
        run(sys.executable, "-m", "agent.cli", "install", self.bundles[("1.0.0", "x86-64")], "--config", config)
        self.spawn("agent", sys.executable, "-m", "agent.cli", "run", "--config", config)
        self.agent_port = self.wait(lambda: _serving_port(self.out / "agent.log"), 60, "the real agent serving")
        threading.Thread(target=self._feed, daemon=True).start()

    def _feed(self) -> None:
        """Real digit images to the real agent, 20 a second (what a camera on a Pi would send)."""
        import numpy as np

        images = np.load(self.out / "test_images.npy")
        url = f"http://127.0.0.1:{self.agent_port}/v2/models/digits/infer"
        index = 0
        while not self._traffic.is_set():
            image = images[index % len(images)][None]
            index += 1
            body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                           "data": image.ravel().tolist()}]}).encode()
            try:
                urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}), timeout=5).read()
            except OSError:
                pass  # a swap or a restart: the next one goes through
            time.sleep(0.05)

    def wait(self, predicate, timeout: float, what: str, every: float = 0.5):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            for name, process in self.processes.items():
                if process.poll() is not None:
                    sys.exit(f"walkthrough: {name} exited ({process.returncode}); see {self.out / (name + '.log')}")
            time.sleep(every)
        sys.exit(f"walkthrough: timed out waiting for {what}; logs in {self.out}")

    def registry(self):
        from edgepack.fleet.registry import FleetRegistry

        return FleetRegistry(self.db)

    def online(self) -> int:
        return sum(1 for row in self.registry().devices() if row["online"])

    def versions(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.registry().devices():
            version = (((row["state"] or {}).get("models") or {}).get("digits") or {}).get("active")
            counts[version] = counts.get(version, 0) + 1
        return counts

    def rollout(self, *args) -> int:
        return json.loads(edgepack("fleet", "rollout", "start", *args, "--db", self.db, "--json"))["id"]

    def show(self, rollout_id: int) -> dict:
        return json.loads(edgepack("fleet", "rollout", "show", str(rollout_id), "--db", self.db, "--json"))

    def stop(self) -> None:
        self._traffic.set()
        for name in ("agent", "simulator", "controller", "mosquitto"):
            process = self.processes.get(name)
            if process and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()


def _real_agreement(fleet: Fleet) -> str:
    """What the real agent measured while it ran v3 in shadow (when it was in the shadow stage)."""
    from sqlalchemy import select

    from edgepack.fleet.db import rollup_shadow

    with fleet.registry().engine.connect() as db:
        row = db.execute(select(rollup_shadow).where(rollup_shadow.c.device == REAL)
                         .order_by(rollup_shadow.c.ts.desc()).limit(1)).first()
    if row is None:
        return " (it was not in the shadow stage)"
    return (f"; in the shadow stage it compared v3 with v1 on {row.samples} real images: agreement "
            f"{row.agreement:.3f}")


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _serving_port(log: Path) -> int | None:
    if not log.exists():
        return None
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == "serving":
            return entry["port"]
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short soaks, stop at the end (CI)")
    parser.add_argument("--out", default=str(ROOT / "examples" / "out" / "fleet"), help="working folder")
    parser.add_argument("--screenshot", help="save a screenshot of the dashboard here at the end (needs selenium + chromium)")
    options = parser.parse_args()
    out = Path(options.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    soak = "5s" if options.quick else "30s"
    started = time.monotonic()

    say("1/6 train three versions of a digits classifier")
    train(out)
    say("2/6 convert each for x86-64 and rpi4 (accuracy gate, signed bundles)")
    edgepack("keys", "generate", "--out", out / "keys")
    bundles = convert(out)
    fleet = Fleet(out, bundles, options.quick)
    try:
        say("3/6 start Mosquitto, the controller with the dashboard, 20 simulated devices and one real agent")
        fleet.start()
        print(f"\n   open the dashboard: http://127.0.0.1:{fleet.dashboard_port}/   (actions need the token "
              f"{fleet.token!r})\n   look at: the device table (filter by profile or version), each rollout's "
              "stages and verdicts, the p95 / error / shadow agreement charts", flush=True)
        for version in ("1.0.0", "2.0.0", "3.0.0"):
            edgepack("fleet", "release", "add", *[bundles[(version, p)] for p in PROFILES], "--db", fleet.db,
                     "--bundles", out / "shelf")

        say("4/6 v1 to everyone (the factory image: every device runs it already)")
        first = fleet.rollout("digits@1.0.0", "--group", "all", "--stages", "100%", "--soak", "0s")
        fleet.wait(lambda: fleet.show(first)["state"] == "done", 60, "v1 recorded everywhere")
        print(f"rollout {first}: done, {fleet.versions()}")

        say("5/6 v2 in stages 10%, 50%, 100%, gated on prediction shift and latency against v1")
        second = fleet.rollout("digits@2.0.0", "--group", "all", "--stages", "10%,50%,100%", "--soak", soak,
                               "--max-prediction-psi", "0.2", "--max-latency-ratio", "1.5", "--min-requests", "100",
                               "--window", "2m")
        head = fleet.wait(lambda: (h := fleet.show(second))["state"] != "running" and h, 240, "the canary verdict")
        if head["state"] != "aborted":
            sys.exit(f"walkthrough: v2 was not stopped ({head['state']})")
        print(f"rollout {second}: aborted at stage {head['stage'] + 1} of 3: {head['reason']}")
        fleet.wait(lambda: set(fleet.versions()) == {"1.0.0"}, 120, "the canary rolled back")
        offered = sum(1 for m in head["members"] if m["status"] not in ("pending", "skipped"))
        print(f"the {offered} canary devices went back to v1 from their other slot; the other "
              f"{len(head['members']) - offered} never saw v2: {fleet.versions()}")

        say("6/6 v3 in shadow on 20% of the fleet, promoted on agreement with v1, then 50%, 100%")
        third = fleet.rollout("digits@3.0.0", "--group", "all", "--stages", "shadow:20%,50%,100%", "--soak", soak,
                              "--min-agreement", "0.9", "--min-shadow-samples", "300", "--max-prediction-psi", "0.5",
                              "--min-requests", "100", "--window", "2m")
        shadow = fleet.wait(lambda: (fleet.show(third)["verdicts"].get("shadow") or {}).get("decision") in ("pass", "abort")
                            and fleet.show(third)["verdicts"]["shadow"], 240, "the shadow verdict")
        print(f"shadow verdict: {shadow['decision']}: agreement {shadow['agreement']} over {shadow['samples']} samples "
              f"on {shadow['reporting']} devices (criterion >= {shadow['criteria']['min_agreement']})")
        head = fleet.wait(lambda: (h := fleet.show(third))["state"] != "running" and h, 300, "v3 everywhere")
        if head["state"] != "done":
            sys.exit(f"walkthrough: v3 did not finish: {head['state']} {head.get('reason')}")
        fleet.wait(lambda: set(fleet.versions()) == {"3.0.0"}, 120, "every device on v3")
        print(f"rollout {third}: done: {fleet.versions()} (the shadow devices installed v3 from their shadow's bundle)")
        real = fleet.registry().device(REAL)
        member = next(m for m in head["members"] if m["device"] == REAL)
        print(f"the real agent {REAL}: now on {((real['state'] or {}).get('models') or {}).get('digits', {}).get('active')}, "
              f"updated in stage {member['stage'] + 1}{_real_agreement(fleet)}")
        if options.screenshot:
            _screenshot(f"http://127.0.0.1:{fleet.dashboard_port}/", options.screenshot)
        print(f"\nwalkthrough finished in {time.monotonic() - started:.0f} s; logs and bundles in {out}")
        if not options.quick:
            print(f"everything keeps running: open http://127.0.0.1:{fleet.dashboard_port}/ ; Ctrl-C stops it")
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        fleet.stop()


def _screenshot(url: str, path: str) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=options)
    try:
        driver.get(url)
        time.sleep(4)
        driver.save_screenshot(path)
        print(f"dashboard screenshot: {path}")
    finally:
        driver.quit()


if __name__ == "__main__":
    sys.exit(main())
