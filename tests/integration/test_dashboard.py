"""The fleet dashboard in a real headless Chromium (Selenium, Debian's chromium + chromium-driver) over a
real controller (`edgepack fleet serve --dashboard`), a real Mosquitto and a simulated fleet: devices
shown and filtered, a rollout's progress and a chart updating live (server-sent events), an action
refused without the token and done with it, no console error, no request leaving the controller; a
screenshot goes to test-output/. The same API over the PostgreSQL registry."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .broker import free_port
from .test_rollout_e2e import Setup, wait_for

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output"
TOKEN = "s3cret-dashboard-token"


def _browser(tmp: Path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install 'edgepack[dev]')")
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    if not binary or not driver_path:
        pytest.skip("no headless browser: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--disable-background-networking", "--disable-component-update", "--no-first-run",
                     "--disable-default-apps", "--disable-sync", "--window-size=1400,1700",
                     f"--user-data-dir={tmp / 'chromium'}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # The system chromedriver, so Selenium Manager never tries to download one
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


def _requests(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def _post(url: str, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, method="POST", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_the_dashboard_shows_a_live_fleet_and_rollout_in_a_real_browser(tmp_path, fleet_bundles):
    driver = _browser(tmp_path)
    setup = Setup(tmp_path, fleet_bundles)
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    try:
        setup.controller("ctl", "--dashboard", f"127.0.0.1:{port}", "--dashboard-token", TOKEN)
        setup.simulate(10, "--metrics", "1.1.0:latency_ms=25")
        setup.online(10)
        setup.release(("1.0.0", "x86-64"))
        setup.release(("1.1.0", "x86-64"))
        wait_for(lambda: _reachable(base), 60, "the dashboard")
        driver.get(base)
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        # Read through JavaScript in one go: the page redraws rows as snapshots arrive
        def rows() -> list[str]:
            return driver.execute_script(
                "return [...document.querySelectorAll('#devices tbody tr[data-device]')].map(r => r.textContent)")

        def text(selector: str) -> str | None:
            return driver.execute_script("const e = document.querySelector(arguments[0]); return e && e.textContent",
                                         selector)

        def attribute(selector: str, name: str) -> str | None:
            return driver.execute_script("const e = document.querySelector(arguments[0]); "
                                         "return e && e.getAttribute(arguments[1])", selector, name)

        def click(selector: str) -> None:
            assert driver.execute_script("const e = document.querySelector(arguments[0]); if (e) e.click(); "
                                         "return !!e", selector), selector

        wait_for(lambda: len(rows()) == 10, 60, "ten devices in the table")
        assert driver.find_element(By.ID, "status").text == "live"
        assert "10 devices, 10 online" in driver.find_element(By.ID, "summary").text
        assert all("fleet 1.0.0" in r for r in rows())
        assert not _severe(driver), _severe(driver)  # the page loaded clean

        # Filters: offline devices (none), then back; a profile filter keeps them all
        Select(driver.find_element(By.NAME, "online")).select_by_visible_text("offline")
        wait_for(lambda: not rows() and "no device matches" in text("#devices"), 20, "filter")
        assert "(0 of 10)" in driver.find_element(By.ID, "device-count").text
        Select(driver.find_element(By.NAME, "online")).select_by_visible_text("all")
        wait_for(lambda: len(rows()) == 10, 20, "the filter lifted")
        wait_for(lambda: "x86-64" in text("#filters select[name=profile]"), 20, "choices")
        Select(driver.find_element(By.NAME, "profile")).select_by_visible_text("x86-64")
        wait_for(lambda: len(rows()) == 10 and "profile=x86-64" in driver.current_url, 20, "the profile filter")

        # A chart draws once telemetry arrives
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#chart-p95_ms canvas"), 120, "the p95 chart")

        # A rollout moves while the page watches: its progress text changes without a reload
        rollout_id = setup.start("fleet@1.1.0", "--group", "all", "--stages", "30%,100%", "--soak", "4s",
                                 "--min-devices", "1")
        card = f".rollout[data-id='{rollout_id}']"
        seen = set()

        def progressed():
            progress = text(f"{card} .progress")
            if progress:
                seen.add(progress)
            return attribute(card, "data-state") == "done"

        wait_for(progressed, 180, "the rollout done on the page", every=0.1)
        assert "committed 10/10" in seen and len(seen) >= 2, seen
        assert driver.find_elements(By.CSS_SELECTOR, f"{card} .stage[data-stage='1']")
        wait_for(lambda: all("fleet 1.1.0" in r for r in rows()), 60, "the table shows 1.1.0")
        # the chart gained the new release as a series, live
        wait_for(lambda: "fleet@1.1.0" in text("#chart-p95_ms"), 120, "1.1.0 in the chart")
        assert not _severe(driver), _severe(driver)

        OUTPUT.mkdir(exist_ok=True)
        driver.save_screenshot(str(OUTPUT / "dashboard.png"))
        assert (OUTPUT / "dashboard.png").stat().st_size > 10_000

        # An action without the token is refused, and nothing is done
        before = len(setup.registry.devices())
        click(f"{card} button[data-action='rollback']")
        wait_for(lambda: attribute("#action-result", "data-status") == "401", 20, "the refusal")
        assert "refused" in text("#action-result") and "token" in text("#action-result")
        assert [r["kind"] for r in json.loads(setup.cli("rollouts", "--json").stdout)] == ["rollout"]
        assert _post(f"{base}api/rollouts/{rollout_id}/rollback", "wrong")[0] == 401
        assert len(setup.registry.devices()) == before
        # With the token the rollback starts and the page shows every device going back
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
        click(f"{card} button[data-action='rollback']")
        wait_for(lambda: attribute("#action-result", "data-status") == "200", 20, "the rollback accepted")
        assert "rollback #" in text("#action-result")
        wait_for(lambda: all("fleet 1.0.0" in r for r in rows()), 120, "every device back on 1.0.0 on the page")
        errors = [e for e in _severe(driver) if "401" not in e.get("message", "")]
        assert not errors, errors  # only the refused action's 401 was logged

        # Nothing the page asked for left the controller
        urls = _requests(driver)
        assert urls and any(u.startswith(f"{base}api/events") for u in urls)
        # (chrome:// and chrome-untrusted:// pages are the browser's own new-tab page before ours, which
        # Chromium 150 logs as requests too; never the network)
        outside = [u for u in urls if not u.startswith(base)
                   and u.split(":", 1)[0] not in ("data", "chrome", "chrome-untrusted", "about")]
        assert not outside, outside
    finally:
        driver.quit()
        setup.close()


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_the_dashboard_api_and_stream_work_over_postgresql(tmp_path):
    from edgepack.fleet.dashboard.server import DashboardServer
    from edgepack.fleet.registry import FleetRegistry

    from .postgres import Postgres

    database = Postgres()
    server = None
    try:
        registry = FleetRegistry(database.url)
        now = time.time()
        batch = []
        for i in range(4):
            device = f"pg-{i}"
            batch.append((device, "state", {"online": i != 3, "profile": "rpi4" if i % 2 else "x86-64", "boot": "b",
                                            "ts": now, "models": {"m": {"active": "2.0.0", "update": {"state": "idle"}}}}))
            for seq in range(3):
                batch.append((device, "telemetry", {
                    "kind": "telemetry", "boot": "b", "seq": seq, "ts": now - 180 + 60 * seq,
                    "models": {"m": {"version": "2.0.0", "requests": {"ok": 90, "error": 10}, "latency_s": {"p95": 0.02},
                                     "shadow": {"version": "2.1.0", "active": "2.0.0", "state": "running",
                                                "agreement": 0.9 + 0.01 * i, "outputs": {"y": {"samples": 10 * (seq + 1)}}}}}}))
        registry.store_batch(batch)
        registry.label("tags", ["pg-1"], ["lab"], [])
        server = DashboardServer(database.url, "127.0.0.1", 0, token=TOKEN, interval=0.2).start()
        snapshot = json.load(urllib.request.urlopen(f"{server.url}api/snapshot?tag=lab", timeout=10))
        assert snapshot["error"] is None
        assert snapshot["devices"]["total"] == 4 and snapshot["devices"]["online"] == 3
        assert [d["device"] for d in snapshot["devices"]["devices"]] == ["pg-1"]
        charts = snapshot["series"]["charts"]
        assert charts["p95_ms"]["releases"] == ["m@2.0.0"] and charts["p95_ms"]["values"][0][-1] == pytest.approx(20.0)
        assert charts["error_rate"]["values"][0][-1] == pytest.approx(0.1)
        # samples-weighted over the devices' latest reports
        assert charts["shadow_agreement"]["releases"] == ["m@2.1.0"]
        assert charts["shadow_agreement"]["values"][0][-1] == pytest.approx(0.915)
        # the stream sends a filtered snapshot, then another once the registry changes
        stream = urllib.request.urlopen(f"{server.url}api/events?online=offline", timeout=10)
        first = _next_event(stream)
        assert [d["device"] for d in first["devices"]["devices"]] == ["pg-3"]
        registry.record_state("pg-0", {"online": False})
        second = _next_event(stream)
        assert sorted(d["device"] for d in second["devices"]["devices"]) == ["pg-0", "pg-3"]
        stream.close()
        assert _post(f"{server.url}api/rollouts/1/pause")[0] == 401
        status, body = _post(f"{server.url}api/rollouts/1/pause", TOKEN)
        assert status == 409 and "no rollout 1" in body["error"]
    finally:
        if server:
            server.stop()
        database.stop()


def _next_event(stream) -> dict:
    data = None
    while True:
        line = stream.readline().decode()
        if line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "\n" and data is not None:
            return data


def test_odd_device_states_rebinding_hosts_and_bad_requests_do_not_break_the_dashboard(tmp_path):
    import http.client

    from edgepack.fleet.dashboard.server import DashboardServer
    from edgepack.fleet.registry import FleetRegistry

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    registry = FleetRegistry(url)
    now = time.time()
    registry.store_batch([
        ("ok-1", "state", {"online": True, "profile": "rpi4", "boot": "b", "ts": now,
                           "models": {"m": {"active": "1.0.0", "update": {"state": "idle"}}}}),
        ("odd-1", "state", {"online": True, "profile": ["x"], "boot": "b", "ts": now,
                            "models": {"m": {"active": 3, "update": {"state": ["idle"]}}}}),
        ("odd-2", "state", {"online": True, "boot": "b", "ts": now, "models": ["not", "a", "dict"]}),
        ("odd-3", "state", {"online": True, "boot": "b", "ts": now, "models": {"m": {"update": {"state": 7}},
                                                                             "<img src=x onerror=alert(1)>": {}}}),
    ])
    server = DashboardServer(url, "127.0.0.1", 0, token=TOKEN, interval=0.2).start()
    try:
        snapshot = json.load(urllib.request.urlopen(f"{server.url}api/snapshot", timeout=10))
        assert snapshot["error"] is None and snapshot["devices"]["total"] == 4
        assert snapshot["devices"]["choices"]["state"] == ["idle"] and snapshot["devices"]["choices"]["profile"] == ["rpi4"]
        port = int(server.url.rsplit(":", 1)[1].strip("/"))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/api/snapshot", headers={"Host": "evil.example:8080"})
        assert connection.getresponse().status == 421  # a rebinding page's request
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("POST", "/api/rollouts/1/pause", headers={"Content-Length": "-5"})
        assert connection.getresponse().status == 400
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/static/../server.py")
        assert connection.getresponse().status == 404
    finally:
        server.stop()
