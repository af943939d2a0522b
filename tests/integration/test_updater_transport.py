"""The updater against a fake MQTT transport: a real store, registry and ONNX Runtime session, no broker.

The transport answers chunk requests in this process and misbehaves on purpose, frame by frame: it
drops, forges (a consistent frame whose bytes are not the signed ones), duplicates and reorders, so each
fault is placed exactly where a broker test can only hope to land it."""

from __future__ import annotations

import asyncio
import json
import time

from edgepack.bundle.signing import load_private_key, load_public_key
from edgepack.fleet import chunks as chunk_frames
from edgepack.fleet import topics
from edgepack.fleet.controller import desired_for_bundles
from edgepack.fleet.desired import sign_desired

from ..conftest import run_cli

DEVICE = "dev1"


class FakeTransport:
    """Answers the updater's chunk requests from bundle files; ``fault(index, attempt, frame)`` says
    which frames go out instead of the one asked for."""

    def __init__(self, files: dict[str, bytes], fault=None):
        self.files, self.fault = files, fault or (lambda index, attempt, frame: [frame])
        self.updater = None
        self.requests: list[list[int]] = []
        self.asked: dict[int, int] = {}

    def publish(self, topic: str, payload: bytes):
        if topic != topics.chunk_requests(DEVICE):
            return 1
        sha, indexes = chunk_frames.parse_request(payload)
        self.requests.append(indexes)
        data = self.files[sha]
        loop = asyncio.get_running_loop()
        frames = []
        for index in indexes:
            attempt = self.asked[index] = self.asked.get(index, 0) + 1
            start = index * chunk_frames.CHUNK_BYTES
            frame = chunk_frames.encode_frame(sha, index, data[start:start + chunk_frames.CHUNK_BYTES])
            frames += self.fault(index, attempt, frame)
        for frame in reversed(frames):  # out of order, as a broker with several paths may deliver them
            loop.call_soon(self.updater.handle_chunk, frame)
        return len(self.requests)


def _forged(frame: bytes) -> bytes:
    """The same chunk with other bytes, in a frame whose own checksum is consistent (a forger's)."""
    header, data = chunk_frames.decode_frame(frame)
    return chunk_frames.encode_frame(header["sha256"], header["index"], bytes(b ^ 0xFF for b in data[:64]) + data[64:])


async def _run_update(tmp_path, setup, fault, pushes, until, updates: dict | None = None, timeout: float = 60):
    """Install 1.0.0, start a registry and an updater on the fake transport, hand it ``pushes``
    (desired-state payloads, with a delay before each), and wait until ``until(update state, events)``
    (``updates``: more agent.yaml ``updates`` settings)."""
    from agent.config import load_config
    from agent.serving.metrics import ServingMetrics
    from agent.serving.registry import ModelRegistry
    from agent.store import ModelStore
    from agent.updates.updater import Updater

    config_path = tmp_path / "agent.yaml"
    config_path.write_text(json.dumps({
        "device_id": DEVICE, "profile": "x86-64", "store": str(tmp_path / "store"),
        "trusted_keys": [str(setup["public"])], "fleet_keys": [str(setup["public"])],
        "mqtt": {"host": "127.0.0.1", "port": 1},
        "updates": {"probation_s": 0.3, "min_runs": 1, "chunk_timeout_s": 0.5, "download_window": 4, **(updates or {})},
    }))
    installed = run_cli("install", setup["bundles"]["1.0.0"], "--config", config_path, program="edgepack-agent")
    assert installed.returncode == 0, installed.stderr
    config = load_config(config_path)
    registry = ModelRegistry(config, ServingMetrics())
    await registry.start()
    files = {}
    for path in setup["bundles"].values():
        import hashlib

        data = path.read_bytes()
        files[hashlib.sha256(data).hexdigest()] = data
    transport = FakeTransport(files, fault)
    events: list[tuple[str, dict]] = []
    updater = Updater(config, registry, DEVICE, transport.publish, lambda kind, body: events.append((kind, body)),
                      [load_public_key(setup["public"])])
    transport.updater = updater
    updater.connected.set()
    updater.start()
    store = ModelStore(tmp_path / "store")
    try:
        for delay, payload in pushes:
            await asyncio.sleep(delay)
            updater.handle_desired(topics.desired(DEVICE), payload)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until(store.state("wide")["update"], events):
            await asyncio.sleep(0.1)
        state = store.state("wide")
        active = state["slots"][state["active"]]["version"]
        served = registry.get("wide").current.version
    finally:
        await updater.close()
        await registry.close()
    return state["update"], active, served, transport, events


def _desired(setup, version: str, desired_version: int, bundle_url: str | None = None) -> bytes:
    state = desired_for_bundles([setup["bundles"][version]], device=DEVICE, group=None, version=desired_version,
                                expires_s=3600, bundle_url=bundle_url)
    return sign_desired(state, load_private_key(setup["private"]))


def test_forged_dropped_duplicated_and_reordered_chunks_still_commit_fetching_only_what_is_missing(
        wide_bundles, tmp_path):
    count = chunk_frames.chunk_count(wide_bundles["bundles"]["1.1.0"].stat().st_size)
    assert count >= 8

    def fault(index, attempt, frame):
        if attempt > 1:
            return [frame]  # asked again: the transport behaves
        if index == 2:
            return []  # dropped
        if index == 5:
            return [_forged(frame)]  # forged: refused by the signed digest, asked again on time-out
        if index == 7:
            return [frame, frame]  # duplicated
        return [frame]

    def committed(update, events):
        return update["state"] == "idle" and (update.get("target") or {}).get("version") == "1.1.0" and update.get("result")

    update, active, served, transport, events = asyncio.run(
        _run_update(tmp_path, wide_bundles, fault, [(0.0, _desired(wide_bundles, "1.1.0", 5))], committed))
    assert update["result"] == "committed" and active == "1.1.0" and served == "1.1.0", update
    refused = [body for kind, body in events if kind == "chunk_refused"]
    assert len(refused) == 1 and refused[0]["refused"] == 1, refused
    # Every chunk asked once, and only the dropped and the forged one asked again.
    assert {index for index, times in transport.asked.items() if times > 1} == {2, 5}, transport.asked
    assert sorted(transport.asked) == list(range(count))
    progress = [body["percent"] for kind, body in events if kind == "download_progress"]
    assert progress and progress == sorted(progress)


def test_a_newer_desired_state_replaces_a_download_that_cannot_finish(wide_bundles, tmp_path):
    """1.1.0's chunk 3 never comes; the fleet goes back to 1.0.0, the version serving, under a newer desired
    version: the stuck download ends and its file is removed (it used to stay ``downloading`` for good,
    because a target that already serves was skipped before the download could be cancelled)."""
    import hashlib

    stuck = hashlib.sha256(wide_bundles["bundles"]["1.1.0"].read_bytes()).hexdigest()

    def fault(index, attempt, frame):
        header, _ = chunk_frames.decode_frame(frame)
        return [] if header["sha256"] == stuck and index == 3 else [frame]

    def replaced(update, events):
        return sum(kind == "desired_accepted" for kind, _ in events) == 2 and update["state"] == "idle"

    update, active, served, transport, events = asyncio.run(_run_update(
        tmp_path, wide_bundles, fault,
        [(0.0, _desired(wide_bundles, "1.1.0", 5)), (2.0, _desired(wide_bundles, "1.0.0", 6))], replaced))
    # 1.0.0 is what the slot already serves: the update ends with it active, and 1.1.0's download is gone.
    assert active == "1.0.0" and served == "1.0.0", update
    assert not list((tmp_path / "store" / "downloads").glob(f"{stuck}*")), list((tmp_path / "store" / "downloads").iterdir())
    assert update["state"] == "idle" and update["result"] == "cancelled", {k: v for k, v in update.items() if k != "history"}
    kinds = [kind for kind, _ in events]
    assert kinds.count("desired_accepted") == 2, kinds
