"""Rollouts with a shadow stage, end to end: a real Mosquitto, the real controller and CLI, and a
simulated fleet running the agent's real update code (the shadow bundle comes over the fleet link
like an update; agreement is scripted per version). A release that agrees is promoted and installed
from the shadow's bundle without a second download; one that disagrees stops the rollout with the
numbers and every device keeps its version."""

from __future__ import annotations

from sqlalchemy import select

from edgepack.fleet.db import messages

from .test_rollout_e2e import setup, wait_for  # noqa: F401 - the fixture

STAGES = ("--stages", "shadow:30%,100%", "--soak", "3s", "--min-shadow-samples", "100", "--min-devices", "1")


def _events(registry, event: str) -> dict[str, list[dict]]:
    with registry.engine.connect() as db:
        rows = db.execute(select(messages.c.device, messages.c.body).where(messages.c.event == event)).all()
    found: dict[str, list[dict]] = {}
    for device, body in rows:
        found.setdefault(device, []).append(body)
    return found


def test_a_release_that_agrees_in_shadow_is_promoted_and_installed_from_the_shadow_bundle(setup):  # noqa: F811
    setup.controller()
    setup.simulate(10)
    setup.online(10)
    setup.release(("1.0.0", "x86-64"))
    setup.release(("1.1.0", "x86-64"))
    rollout_id = setup.start("fleet@1.1.0", "--group", "all", *STAGES)
    head = wait_for(lambda: (h := setup.show(rollout_id))["state"] != "running" and h, 180, "the rollout to finish")
    assert head["state"] == "done", head["reason"]
    shadow = head["verdicts"]["shadow"]
    assert shadow["decision"] == "pass" and shadow["agreement"] == 1.0 and shadow["samples"] >= 100
    assert shadow["devices"] == 3 and shadow["reporting"] >= 1, shadow  # a slow device's first report may come later
    assert set(setup.active().values()) == {"1.1.0"}
    started = _events(setup.registry, "shadow_started")
    assert len(started) == 3 and all(b[0]["version"] == "1.1.0" for b in started.values())
    # the shadow devices took 1.1.0 from their shadow's bundle: no second download
    skipped = _events(setup.registry, "download_skipped")
    assert set(skipped) == set(started), (skipped, started)
    promoted = [m for m in head["members"] if m["device"] in started]
    assert all(m["status"] == "committed" for m in promoted)


def test_a_release_that_disagrees_in_shadow_stops_the_rollout_and_no_device_changes_version(setup):  # noqa: F811
    setup.controller()
    setup.simulate(10, "--metrics", "1.1.0:agreement=0.7")
    setup.online(10)
    setup.release(("1.0.0", "x86-64"))
    setup.release(("1.1.0", "x86-64"))
    rollout_id = setup.start("fleet@1.1.0", "--group", "all", *STAGES, "--min-agreement", "0.9")
    head = wait_for(lambda: (h := setup.show(rollout_id))["state"] != "running" and h, 180, "the shadow verdict")
    assert head["state"] == "aborted" and "agreement" in head["reason"], head["reason"]
    shadow = head["verdicts"]["shadow"]
    assert shadow["decision"] == "abort" and 0.6 < shadow["agreement"] < 0.8 and shadow["samples"] >= 100
    assert "samples on 3 devices" in head["reason"]
    # every shadow device is told to stop it, and stops it; nobody ran 1.1.0 as active
    wait_for(lambda: len(_events(setup.registry, "shadow_stopped")) == 3, 60, "the shadows stopped")
    assert {m["status"] for m in setup.show(rollout_id)["members"]} <= {"shadow_ended", "pending"}
    assert set(setup.active().values()) == {"1.0.0"}
    assert not _events(setup.registry, "download_skipped")
    shown = setup.cli("rollout", "show", str(rollout_id)).stdout
    assert "agreement" in shown
