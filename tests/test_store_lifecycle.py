"""The store's update lifecycle: the transition table, and real processes killed with SIGKILL in every
state (right after the state is persisted, and at random moments inside the side effects), then
recovered: the old version active or the new one committed, never neither, and no leftovers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from agent.updates import lifecycle
from agent.updates.lifecycle import TRANSITIONS, TransitionError, UpdateState, step
from agent.store import ModelStore
from edgepack.bundle.signing import generate_keys
from edgepack.errors import StoreError

from .conftest import ROOT, run_cli

# Runs in a child process: install v1, then take v2 through the over-the-air sequence (or a local
# install), SIGKILLing itself right after the transition into KILL_IN is on disk.
SCRIPT = r"""
import os, signal, sys
from pathlib import Path
from agent.store import ModelStore
store_root, old, new, path, kill_in = sys.argv[1:6]
store = ModelStore(Path(store_root))
store.install(Path(old))
target = "staging" if kill_in == "staging-install" else kill_in
def killer(name, entry, state):
    if entry["to"] == target:
        os.kill(os.getpid(), signal.SIGKILL)
store.listeners.append(killer)  # after v1 is in: the first transition into the target state is v2's
with store.locked():
    if path == "local":
        store.install(Path(new))
    else:
        store.transition("digits", "download", target={"version": "2.0.0"})
        store.transition("digits", "downloaded")
        store.stage("digits", Path(new))
        store.switch("digits")
        if path == "commit":
            store.commit("digits", "healthy")
        else:
            store.regress("digits", "error rate 1.00 > 0.05")
print("finished")
"""

KILL_POINTS = [(state.value, "commit") for state in UpdateState if state is not UpdateState.ROLLING_BACK] + [
    ("rolling_back", "regress"), ("idle", "regress"), ("staging-install", "local"), ("switching", "local"),
    ("idle", "local")]


def _versions(store: ModelStore) -> tuple[str | None, dict]:
    state = store.state("digits")
    active = state["active"]
    return (state["slots"][active]["version"] if active else None), state


def _check_consistent(store_root, outcome_allowed: set[str], update_state: str = "idle") -> str:
    """Recover (as the next daemon start or install does; no daemon runs), then check the store is whole."""
    status = run_cli("status", "--store", store_root, "--json", program="edgepack-agent")
    assert status.returncode == 0, status.stderr  # status reads; it changes nothing
    store = ModelStore(store_root)
    store.recover()
    version, state = _versions(store)
    assert version in outcome_allowed, state
    assert state["update"]["state"] == update_state, state["update"]
    assert store.slot_health("digits", state["active"]) == "ok"
    # No leftovers: no staging folder, no slot that no pointer names, no temp state files.
    folder = store.model_dir("digits")
    assert not (folder / "staging").exists()
    named = {state["active"], state["previous"]} - {None}
    assert {p.name for p in (folder / "slots").iterdir()} == named
    assert not list(folder.glob(".state.json.*"))
    store.load_active("digits", smoke=True).close()
    return version


def test_transition_table_and_step():
    record = lifecycle.idle_record()
    for (state, event), following in TRANSITIONS.items():
        assert step({**record, "state": state.value}, event)["state"] == following.value
    with pytest.raises(TransitionError):
        step(record, "commit")
    done = step(step(record, "install"), "fail", "bad signature")
    assert done["state"] == "idle" and done["result"] == "failed" and done["reason"] == "bad signature"
    assert [h["to"] for h in done["history"]] == ["staging", "idle"]
    # every state has a way out after a crash
    for state in UpdateState:
        event = lifecycle.recovery_event({"state": state.value})
        assert event is None if state is UpdateState.IDLE else (state, event) in TRANSITIONS


@pytest.mark.parametrize("kill_in,path", KILL_POINTS, ids=[f"{p}-{k}" for k, p in KILL_POINTS])
def test_kill_9_in_every_update_state(serving_bundles, tmp_path, kill_in, path):
    old, new, _ = serving_bundles
    store_root = tmp_path / "store"
    child = subprocess.run([sys.executable, "-c", SCRIPT, store_root, old, new, path, kill_in], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    expected = {"1.0.0", "2.0.0"}
    if kill_in in ("downloading", "staging", "staging-install", "switching", "probation", "rolling_back"):
        expected = {"1.0.0"}  # not committed yet: the old version must be the one active
    elif kill_in == "idle" and path in ("commit", "local"):
        expected = {"2.0.0"}
    # Without a daemon to finish it, an interrupted download is cancelled (a daemon resumes it).
    version = _check_consistent(store_root, expected)
    history = ModelStore(store_root).state("digits")["update"]["history"]
    if kill_in == "probation":
        assert history[-1]["reason"] == "the agent restarted during probation"
    assert version == "1.0.0" or history[-1]["event"] == "commit"


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3, 0.5, 0.8, 1.2])
def test_kill_9_at_random_moments_of_a_local_install(serving_bundles, tmp_path, delay):
    old, new, _ = serving_bundles
    store_root = tmp_path / "store"
    assert run_cli("install", old, "--store", store_root, program="edgepack-agent").returncode == 0
    process = subprocess.Popen([sys.executable, "-m", "agent.cli", "install", str(new), "--store", str(store_root)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    _check_consistent(store_root, {"1.0.0", "2.0.0"})


def test_commands_leave_a_running_daemons_update_alone(serving_bundles, tmp_path):
    old, new, _ = serving_bundles
    store = ModelStore(tmp_path / "store")
    store.install(old)
    with store.locked():
        store.transition("digits", "download", target={"version": "2.0.0"})
        store.transition("digits", "downloaded")
        store.stage("digits", new)
        store.switch("digits")
    with store.daemon_lock():  # a daemon serves the store; its new version is on probation
        for command in (["status"], ["rollback"], ["install", old]):
            run_cli(*command, "--store", tmp_path / "store", program="edgepack-agent")
        state = ModelStore(tmp_path / "store").state("digits")
        assert state["update"]["state"] == "probation" and state["slots"][state["active"]]["version"] == "2.0.0"
        with pytest.raises(StoreError, match="another edgepack-agent daemon"):
            with ModelStore(tmp_path / "store").daemon_lock():
                pass


def test_lock_refuses_a_second_writer(serving_bundles, tmp_path):
    old, _, _ = serving_bundles
    holder = ModelStore(tmp_path / "store")
    other = ModelStore(tmp_path / "store")
    with holder.locked():
        with pytest.raises(StoreError, match="another install or update"):
            with other.locked(wait_s=0.2):
                pass
    released = threading.Event()

    def hold():
        with holder.locked():
            released.wait(0.5)

    thread = threading.Thread(target=hold)
    thread.start()
    time.sleep(0.1)
    other.install(old)  # waits for the holder, then installs
    thread.join()
    assert _versions(other)[0] == "1.0.0"


def test_local_install_and_rollback_take_precedence_over_a_download(serving_bundles, tmp_path):
    old, new, _ = serving_bundles
    store = ModelStore(tmp_path / "store")
    store.install(old)
    store.install(new)
    store.transition("digits", "download", target={"version": "3.0.0"})
    state = store.rollback("digits")  # the operator's brake: the download is cancelled, not waited for
    assert _versions(store)[0] == "1.0.0" and state["local"]["action"] == "rollback"
    assert [h["event"] for h in state["update"]["history"][-2:]] == ["cancel", "rollback"]
    store.transition("digits", "download", target={"version": "3.0.0"})
    assert store.install(new)["local"]["action"] == "install"
    assert _versions(store)[0] == "2.0.0"
    # an update past its download (here: on probation) still refuses them
    store.transition("digits", "reactivate", target={"version": "1.0.0"}, slot=store.state("digits")["previous"],
                     staged=store.state("digits")["slots"][store.state("digits")["previous"]])
    store.switch("digits")
    with pytest.raises(StoreError, match="under way"):
        store.install(old)
    with pytest.raises(StoreError, match="under way"):
        store.rollback("digits")


def test_rollback_loads_and_smoke_tests_its_target(serving_bundles, tmp_path):
    old, new, _ = serving_bundles
    store = ModelStore(tmp_path / "store")
    store.install(old)
    store.install(new)
    previous = store.state("digits")["previous"]
    bundle = store.slot_dir("digits", previous) / "bundle.edgepack"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x01  # the previous version's bundle itself is damaged: nothing to rebuild from
    bundle.write_bytes(bytes(data))
    model_file = next((store.slot_dir("digits", previous) / "files" / "model").iterdir())
    model_file.write_bytes(b"garbage")
    with pytest.raises(Exception):
        store.rollback("digits")
    assert _versions(store)[0] == "2.0.0"  # still the working version


def test_install_reads_the_daemon_config(serving_bundles, tmp_path):
    old, _, _ = serving_bundles
    keys = tmp_path / "keys"
    _, public = generate_keys(keys)
    config = tmp_path / "agent.yaml"
    config.write_text(f"store: {tmp_path / 'store'}\ntrusted_keys: [{public}]\n")
    refused = run_cli("install", old, "--config", config, program="edgepack-agent")
    assert refused.returncode != 0 and "sign" in refused.stderr, refused.stderr
    config.write_text(f"store: {tmp_path / 'store'}\nprofile: rpi4\n")
    env = {**os.environ, "EDGEPACK_AGENT_CONFIG": str(config)}
    refused = run_cli("install", old, env=env, program="edgepack-agent")
    assert refused.returncode != 0 and "built for profile 'x86-64'" in refused.stderr, refused.stderr
    assert ModelStore(tmp_path / "store").model_names() == []


def test_schema_1_state_files_still_read(serving_bundles, tmp_path):
    old, _, _ = serving_bundles
    store = ModelStore(tmp_path / "store")
    store.install(old)
    path = store.model_dir("digits") / "state.json"
    state = json.loads(path.read_text())
    legacy = {k: state[k] for k in ("name", "active", "previous", "slots")}
    path.write_text(json.dumps(legacy))
    assert store.state("digits")["update"]["state"] == "idle"
    assert store.load_active("digits") is not None
    newer = {**state, "schema": 99}
    path.write_text(json.dumps(newer))
    with pytest.raises(StoreError, match="upgrade edgepack"):
        store.state("digits")
