"""Bundles downloaded from an HTTP(S) source the signed desired state names, from a real nginx with
Range support: resumed after the server is killed mid-body, refused chunk by chunk when the server
holds other bytes (the rest then comes over MQTT), over TLS only with a trusted certificate.

The updater is the real one (store, registry, ONNX Runtime session) on the fake MQTT transport of
``test_updater_transport``, so what came over MQTT is counted exactly."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import threading

from edgepack.fleet import chunks as chunk_frames

from .nginx import Nginx
from .test_updater_transport import _desired, _run_update

_FAST = {"http_timeout_s": 3.0, "http_attempts": 3}


def _committed(update, events):
    return update["state"] == "idle" and (update.get("target") or {}).get("version") == "1.1.0" and update.get("result")


def _shelf(setup, folder):
    """The content-addressed copy of 1.1.0 a controller's shelf (or a bucket synced from it) holds."""
    folder.mkdir()
    path = setup["bundles"]["1.1.0"]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    shutil.copy(path, folder / f"{sha}.edgepack")
    return folder / f"{sha}.edgepack"


def test_a_download_from_nginx_resumes_after_the_server_is_killed_mid_body(wide_bundles, tmp_path):
    """nginx sends at 250 KB/s; it is killed -9 once a third has arrived and started again: the agent
    asks only for the rest (a Range from where it stopped), nothing comes over MQTT, and it commits."""
    bundle = _shelf(wide_bundles, tmp_path / "shelf")
    size = bundle.stat().st_size
    server = Nginx(tmp_path / "shelf", rate="250k").start()
    cut = {}

    def kill_once(update, events):
        progress = [body["percent"] for kind, body in events if kind == "download_progress"]
        if not cut and progress and progress[-1] >= 30:
            cut["at"] = progress[-1]
            server.kill()
            threading.Timer(0.5, server.start).start()  # back while the agent backs off
        return _committed(update, events)

    try:
        update, active, served, transport, events = asyncio.run(_run_update(
            tmp_path, wide_bundles, lambda index, attempt, frame: [],  # MQTT never answers
            [(0.0, _desired(wide_bundles, "1.1.0", 5, bundle_url=server.url))], kill_once, updates=_FAST))
        logged = server.requests()
    finally:
        server.stop()
    assert update["result"] == "committed" and active == "1.1.0" and served == "1.1.0", update
    assert cut, "the download finished before the server could be killed"
    assert transport.requests == [], "chunks were asked over MQTT"
    assert [kind for kind, _ in events].count("download_source_failed") == 0
    # The request cut by the kill is never logged (nginx logs at the end); every one after the restart
    # starts where the received chunks end, never at 0 again, and they carry less than the whole file.
    ranges = [entry["range"] for entry in logged if entry["status"] == 206]
    starts = [int(r.split("=")[1].split("-")[0]) for r in ranges]
    assert starts and all(start > 0 and start % chunk_frames.CHUNK_BYTES == 0 for start in starts), logged
    assert all(r.endswith(f"-{size - 1}") for r in ranges), logged
    assert sum(entry["bytes"] for entry in logged) <= size - starts[0] + chunk_frames.CHUNK_BYTES * (len(logged) - 1)
    assert "edgepack-agent (dev1)" in logged[0]["agent"]


def test_a_source_holding_other_bytes_is_refused_by_chunk_and_mqtt_brings_the_rest(wide_bundles, tmp_path):
    """The file on the server differs from the signed one in chunk 4: chunks 0-3 are kept, chunk 4 is
    refused on every try, and after the tries MQTT is asked for chunk 4 onwards only."""
    bundle = _shelf(wide_bundles, tmp_path / "shelf")
    data = bytearray(bundle.read_bytes())
    data[4 * chunk_frames.CHUNK_BYTES + 10] ^= 0xFF
    bundle.write_bytes(bytes(data))
    with Nginx(tmp_path / "shelf") as server:
        update, active, served, transport, events = asyncio.run(_run_update(
            tmp_path, wide_bundles, None, [(0.0, _desired(wide_bundles, "1.1.0", 5, bundle_url=server.url))],
            _committed, updates=_FAST))
        logged = server.requests()
    assert update["result"] == "committed" and active == "1.1.0" and served == "1.1.0", update
    failed = [body for kind, body in events if kind == "download_source_failed"]
    assert len(failed) == 1 and "chunk 4 does not match its signed digest" in failed[0]["message"], failed
    assert failed[0]["chunks"] == 4 and failed[0]["fallback"] == "mqtt"
    asked = sorted({index for request in transport.requests for index in request})
    assert asked and min(asked) == 4, asked
    assert len([entry for entry in logged if entry["status"] == 206]) == _FAST["http_attempts"], logged


def test_a_missing_file_falls_back_to_mqtt_at_once(wide_bundles, tmp_path):
    (tmp_path / "empty").mkdir()
    with Nginx(tmp_path / "empty") as server:
        update, active, _, transport, events = asyncio.run(_run_update(
            tmp_path, wide_bundles, None, [(0.0, _desired(wide_bundles, "1.1.0", 5, bundle_url=server.url))],
            _committed, updates=_FAST))
        logged = server.requests()
    assert update["result"] == "committed" and active == "1.1.0", update
    failed = [body for kind, body in events if kind == "download_source_failed"]
    assert len(failed) == 1 and "HTTP 404" in failed[0]["message"] and "\n" not in failed[0]["message"], failed
    assert [entry["status"] for entry in logged] == [404]  # fatal: not tried again
    assert transport.requests


def test_an_https_source_is_used_only_with_a_trusted_certificate(wide_bundles, tmp_path):
    """nginx over TLS with a certificate from a test CA: with updates.http_ca_file the whole bundle comes
    over HTTPS; without it the certificate is refused in one line and MQTT brings the bundle."""
    from .tls import certificate_authority

    _shelf(wide_bundles, tmp_path / "shelf")
    made = certificate_authority(tmp_path / "pki", ["server"])
    (tmp_path / "trusted").mkdir()
    (tmp_path / "untrusted").mkdir()
    with Nginx(tmp_path / "shelf", tls=made["server"]) as server:
        assert server.url.startswith("https://")
        trusted = asyncio.run(_run_update(
            tmp_path / "trusted", wide_bundles, None, [(0.0, _desired(wide_bundles, "1.1.0", 5, bundle_url=server.url))],
            _committed, updates={**_FAST, "http_ca_file": str(made["ca"][0])}))
        untrusted = asyncio.run(_run_update(
            tmp_path / "untrusted", wide_bundles, None, [(0.0, _desired(wide_bundles, "1.1.0", 5, bundle_url=server.url))],
            _committed, updates=_FAST))
    update, active, _, transport, events = trusted
    assert update["result"] == "committed" and active == "1.1.0" and transport.requests == [], update
    update, active, _, transport, events = untrusted
    assert update["result"] == "committed" and active == "1.1.0" and transport.requests
    failed = [body for kind, body in events if kind == "download_source_failed"]
    assert len(failed) == 1 and "certificate is not trusted" in failed[0]["message"], failed
