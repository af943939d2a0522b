"""The rollout state machine against a real (SQLite) registry and fake devices, no broker: stages,
abort on install failures and on model metrics, rollback from the slot, offline devices, a restart
that offers nobody twice, per-profile bundles, and the CLI's refusals."""

from __future__ import annotations

import base64
import json
import time

import pytest

from edgepack.bundle.signing import generate_keys, load_private_key, load_public_key
from edgepack.errors import UsageError
from edgepack.fleet import chunks, rollouts, topics
from edgepack.fleet.db import bundles, release_bundles, releases
from edgepack.fleet.desired import verify_desired
from edgepack.fleet.registry import FleetRegistry

from .conftest import run_cli


class FakeController:
    """What the tick needs from a controller; publishes into a dict instead of a broker."""

    def __init__(self, registry, key, client_id="c1"):
        self.registry, self.signing_key, self.client_id, self.tick_s = registry, key, client_id, 0.1
        self.published: list[tuple[str, bytes]] = []

    def publish_desired(self, topic, payload):
        self.published.append((topic, payload))
        return True


class FakeFleet:
    """Devices that answer desired states the way agents do: install (or fail), report state and
    telemetry with scripted figures per version."""

    def __init__(self, registry, public, count=100, profiles=("x86-64",), fail=(), offline=(), model="m"):
        self.registry, self.public, self.model = registry, public, model
        self.devices = {f"d{i:03d}": {"profile": profiles[i % len(profiles)], "active": "1.0.0", "previous": None,
                                      "online": f"d{i:03d}" not in offline, "result": None, "target": None}
                        for i in range(count)}
        self.fail = set(fail)
        self.downloads: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        for device in self.devices:
            self.report(device)

    def report(self, device):
        d = self.devices[device]
        state = {"online": d["online"], "profile": d["profile"], "groups": ["all"], "accepts": ["renews"],
                 "models": {self.model: {"active": d["active"], "previous": d["previous"], "target": d["target"],
                                         "update": {"state": "idle", "result": d["result"], "since": time.time()}}}}
        self.registry.record_state(device, state)

    def deliver(self, published, slots_hold=True):
        for topic, payload in published:
            device = topic.split("/")[3]
            d = self.devices[device]
            if not d["online"]:
                continue
            state = verify_desired(payload, [self.public])
            if state.version <= self.seen.get(device, 0):
                continue
            self.seen[device] = state.version
            assert list(state.bundles) == [d["profile"]]  # only its own profile's bundle
            version = state.model.version
            d["target"] = version
            if version == d["active"]:
                continue
            if version == d["previous"] and slots_hold:
                d["active"], d["previous"], d["result"] = version, d["active"], "committed"  # from the slot
            elif device in self.fail:
                d["result"] = "rolled_back"
            else:
                self.downloads[device] = self.downloads.get(device, 0) + 1
                d["active"], d["previous"], d["result"] = version, d["active"], "committed"
            self.report(device)

    def telemetry(self, scripts: dict, seq=[0]):
        for device, d in self.devices.items():
            if not d["online"]:
                continue
            script = scripts.get(d["active"], scripts["default"])
            seq[0] += 1
            body = {"kind": "telemetry", "boot": "b", "seq": seq[0], "ts": time.time(),
                    "models": {self.model: {"version": d["active"], "requests": {"ok": 50 - script.get("errors", 0),
                                                                                 "error": script.get("errors", 0)},
                                            "latency_s": {"p95": script["p95"]},
                                            "predictions": script.get("classes", {"0": 25, "1": 25})}}}
            self.registry.record_message(device, body)


def _release(registry, version, profiles=("x86-64", "rpi4")):
    digest = base64.b64encode(b"\0" * 16).decode()
    with registry.engine.begin() as db:
        db.execute(releases.insert().values(name="m", version=version, created=time.time()))
        for profile in profiles:
            sha = f"{hash((version, profile)) & (2 ** 64 - 1):064x}"
            db.execute(bundles.insert().values(sha256=sha, size=100, name="m", version=version, profile=profile,
                                               chunk_bytes=chunks.CHUNK_BYTES, chunks=digest))
            db.execute(release_bundles.insert().values(name="m", version=version, profile=profile, sha256=sha))


@pytest.fixture()
def setup(tmp_path):
    private, public = generate_keys(tmp_path / "keys")
    registry = FleetRegistry(f"sqlite:///{tmp_path / 'fleet.db'}")
    _release(registry, "1.0.0")
    _release(registry, "1.1.0")
    return registry, FakeController(registry, load_private_key(private)), load_public_key(public), tmp_path


def _run(controller, fleet, ticks=40, scripts=None, until=None):
    for _ in range(ticks):
        rollouts.tick(controller)
        fleet.deliver(controller.published)
        if scripts:
            fleet.telemetry(scripts)
        if until and until():
            return


def _show(registry, rollout_id):
    (head,) = rollouts.summary(registry, rollout_id)
    return head


def test_install_failures_abort_and_updated_devices_go_back_from_the_slot(setup):
    registry, controller, public, _ = setup
    fleet = FakeFleet(registry, public, 100, fail={f"d{i:03d}" for i in range(0, 100, 5)})  # 20%
    rollout_id = rollouts.start(registry, "m", "1.1.0", {"group": "all"},
                                {"stages": rollouts.parse_stages("30%,100%"), "soak_s": 0},
                                {"max_failure_pct": 10, "min_finished": 20})
    _run(controller, fleet, until=lambda: _show(registry, rollout_id)["state"] == "aborted")
    _run(controller, fleet, ticks=5)
    head = _show(registry, rollout_id)
    assert head["state"] == "aborted" and "failed" in head["reason"], head
    verdict = head["verdicts"]["failures"]
    assert verdict["finished"] >= 20 and verdict["failure_pct"] >= 10
    offered = {m["device"] for m in head["members"] if m["offered_at"]}
    assert len(offered) == 30  # nothing more was offered after the abort (stage 1 is 30 devices)
    assert all(fleet.devices[d]["active"] == "1.0.0" for d in fleet.devices)  # everyone on the old version
    updated = [m for m in head["members"] if m["status"] == "rolled_back"]
    assert updated and all(fleet.downloads.get(m["device"]) == 1 for m in updated)  # no second download
    assert head["counts"].get("failed", 0) >= 1


@pytest.mark.parametrize("script, field", [
    ({"p95": 0.03}, "latency_ratio"),  # 3x slower
    ({"p95": 0.01, "errors": 3}, "error_delta"),  # 6% errors
    ({"p95": 0.01, "classes": {"0": 45, "1": 5}}, "prediction_psi"),  # the predicted classes shift
])
def test_a_release_that_is_slower_errs_or_shifts_predictions_stops_at_its_first_stage(setup, script, field):
    registry, controller, public, _ = setup
    fleet = FakeFleet(registry, public, 50)
    rollout_id = rollouts.start(registry, "m", "1.1.0", {"group": "all"},
                                {"stages": rollouts.parse_stages("10%,100%"), "soak_s": 0},
                                {"max_latency_ratio": 1.5, "max_error_delta": 0.02, "max_prediction_psi": 0.2,
                                 "min_requests": 200})
    scripts = {"default": {"p95": 0.01}, "1.1.0": script}
    _run(controller, fleet, scripts=scripts, until=lambda: _show(registry, rollout_id)["state"] != "running")
    _run(controller, fleet, ticks=3)
    head = _show(registry, rollout_id)
    assert head["state"] == "aborted", head
    metrics = head["verdicts"]["metrics"]["profiles"]["x86-64"]
    assert metrics["decision"] == "abort" and field in head["reason"], head["reason"]
    assert metrics[field] is not None
    assert len([m for m in head["members"] if m["offered_at"]]) == 5  # the first stage only
    assert all(d["active"] == "1.0.0" for d in fleet.devices.values())
    # the CLI shows the numbers
    shown = run_cli("fleet", "rollout", "show", str(rollout_id), "--db", str(registry.engine.url))
    assert shown.returncode == 0 and field in shown.stdout and "abort" in shown.stdout, shown.stdout


def test_a_good_release_goes_through_every_stage(setup):
    registry, controller, public, _ = setup
    fleet = FakeFleet(registry, public, 40, profiles=("x86-64", "rpi4"))
    rollout_id = rollouts.start(registry, "m", "1.1.0", {"group": "all"},
                                {"stages": rollouts.parse_stages("5%,50%,100%"), "soak_s": 0},
                                {"max_latency_ratio": 1.5, "min_requests": 100})
    stages_seen = set()

    def done():
        head = _show(registry, rollout_id)
        stages_seen.add(head["stage"])
        return head["state"] == "done"

    _run(controller, fleet, ticks=60, scripts={"default": {"p95": 0.01}}, until=done)
    head = _show(registry, rollout_id)
    assert head["state"] == "done" and stages_seen >= {0, 1, 2}, (head["stage"], head["counts"], head["verdicts"])
    assert head["counts"] == {"committed": 40}
    assert all(d["active"] == "1.1.0" for d in fleet.devices.values())
    # a device of another profile got its own bundle (FakeFleet.deliver checks the profile's key)
    assert {d["profile"] for d in fleet.devices.values()} == {"x86-64", "rpi4"}


def test_offline_device_converges_and_a_restart_offers_nobody_twice(setup):
    registry, controller, public, _ = setup
    fleet = FakeFleet(registry, public, 20, offline={"d003"})
    rollout_id = rollouts.start(registry, "m", "1.1.0", {"group": "all"},
                                {"stages": rollouts.parse_stages("50%,100%"), "soak_s": 0}, {})
    _run(controller, fleet, ticks=3)
    # "kill -9": a new controller over the same database goes on from there
    restarted = FakeController(registry, controller.signing_key, client_id="c1")
    _run(restarted, fleet, ticks=30, until=lambda: _show(registry, rollout_id)["state"] == "done")
    head = _show(registry, rollout_id)
    assert head["state"] == "done"
    assert fleet.devices["d003"]["active"] == "1.0.0"  # still away
    fleet.devices["d003"]["online"] = True
    fleet.report("d003")
    fleet.deliver(restarted.published)  # the retained desired state waits on the broker for it
    _run(restarted, fleet, ticks=2)
    assert fleet.devices["d003"]["active"] == "1.1.0"
    assert _show(registry, rollout_id)["counts"] == {"committed": 20}
    # nobody offered twice: one desired-state version per device (a republish sends the same bytes)
    versions: dict[str, set] = {}
    for topic, payload in controller.published + restarted.published:
        versions.setdefault(topic, set()).add(json.loads(json.loads(payload)["desired"])["version"])
    assert all(len(v) == 1 for v in versions.values()), versions


def test_fleet_rollback_and_pause_resume_abort_requests(setup):
    registry, controller, public, _ = setup
    fleet = FakeFleet(registry, public, 10)
    first = rollouts.start(registry, "m", "1.1.0", {"group": "all"}, {"stages": [{"percent": 100.0}], "soak_s": 0}, {})
    _run(controller, fleet, ticks=10, until=lambda: _show(registry, first)["state"] == "done")
    assert all(d["active"] == "1.1.0" for d in fleet.devices.values())
    back = rollouts.start_rollback(registry, None, None, ("m", "1.1.0"))
    _run(controller, fleet, ticks=10, until=lambda: _show(registry, back)["counts"].get("committed") == 10)
    assert all(d["active"] == "1.0.0" for d in fleet.devices.values())
    assert all(n == 1 for n in fleet.downloads.values())  # back from the slot, no download
    # steering is done by the tick
    again = rollouts.start(registry, "m", "1.1.0", {"group": "all"},
                           {"stages": rollouts.parse_stages("1,100%"), "soak_s": 0}, {})
    rollouts.request(registry, again, "pause")
    _run(controller, fleet, ticks=3)
    assert _show(registry, again)["state"] == "paused"
    assert len([m for m in _show(registry, again)["members"] if m["offered_at"]]) == 0  # paused before offering
    with pytest.raises(UsageError, match="cannot be paused"):
        rollouts.request(registry, again, "pause")
    rollouts.request(registry, again, "resume")
    _run(controller, fleet, ticks=2)
    assert _show(registry, again)["state"] == "running"
    rollouts.request(registry, again, "abort")
    _run(controller, fleet, ticks=3)
    assert _show(registry, again)["state"] == "aborted"
    assert all(d["active"] == "1.0.0" for d in fleet.devices.values())


def test_start_refuses_what_cannot_work(setup):
    registry, controller, public, _ = setup
    FakeFleet(registry, public, 3)
    with pytest.raises(UsageError, match="no release m@9.9.9"):
        rollouts.start(registry, "m", "9.9.9", {"group": "all"})
    with pytest.raises(UsageError, match="unknown devices: nope"):
        rollouts.start(registry, "m", "1.1.0", {"devices": ["nope"]})
    with pytest.raises(UsageError, match="no device matches"):
        rollouts.start(registry, "m", "1.1.0", {"group": "elsewhere"})
    rollouts.start(registry, "m", "1.1.0", {"group": "all"})
    with pytest.raises(UsageError, match="is in rollout 1"):
        rollouts.start(registry, "m", "1.1.0", {"devices": ["d001"]})
    for bad in ("0%", "x", ""):
        with pytest.raises(UsageError):
            rollouts.parse_stages(bad)
    assert rollouts.parse_duration("10m") == 600 and rollouts.parse_rate("10/min") == 10
    assert rollouts._rate_allowed({"rate_per_min": 10, "growth": 2}, 0, 120) == 30  # 10 + 20
    assert topics.desired("d001").endswith("/desired")


def test_desired_states_are_renewed_before_they_expire_unless_the_device_failed_them(setup):
    registry, controller, public, _ = setup
    fleet = FakeFleet(registry, public, 6, fail={"d002"})
    rollout_id = rollouts.start(registry, "m", "1.1.0", {"group": "all"}, {"stages": [{"percent": 100.0}], "soak_s": 0},
                                {"max_failure_pct": 90})
    _run(controller, fleet, ticks=10, until=lambda: _show(registry, rollout_id)["state"] == "done")
    before = len(controller.published)
    assert rollouts.freshen(controller, time.time()) == 0  # young: nothing to do
    later = time.time() + 13 * 3600  # past half of the one-day life
    assert rollouts.freshen(controller, later) == 5  # not d002: it failed that version
    renewed = controller.published[before:]
    assert {topic.split("/")[3] for topic, _ in renewed} == {f"d00{i}" for i in (0, 1, 3, 4, 5)}
    for _, payload in renewed:
        state = verify_desired(payload, [public], now=later)
        assert state.model.version == "1.1.0" and state.expires_at > later + 20 * 3600
    fleet.deliver(controller.published)  # the devices take them as no-ops
    assert all(d["active"] == ("1.0.0" if name == "d002" else "1.1.0") for name, d in fleet.devices.items())


def test_an_abort_cut_short_is_finished_at_the_next_tick_and_retries_wait_for_their_own_result(setup):
    registry, controller, public, _ = setup
    fleet = FakeFleet(registry, public, 10)
    rollout_id = rollouts.start(registry, "m", "1.1.0", {"group": "all"},
                                {"stages": rollouts.parse_stages("50%,100%"), "soak_s": 3600}, {})
    _run(controller, fleet, ticks=10, until=lambda: _show(registry, rollout_id)["counts"].get("committed") == 5)
    real, sent = rollouts.offer, []

    def crashing(*args, **kwargs):  # the controller dies after three rollback offers
        if len(sent) == 3:
            raise RuntimeError("killed")
        sent.append(args[2]["device"])
        return real(*args, **kwargs)

    rollouts.offer = crashing
    try:
        rollouts.request(registry, rollout_id, "abort")
        rollouts.tick(controller)
    finally:
        rollouts.offer = real
    assert _show(registry, rollout_id)["state"] == "aborted" and len(sent) == 3
    _run(controller, fleet, ticks=5)
    assert all(d["active"] == "1.0.0" for d in fleet.devices.values())  # the next ticks finished it
    assert _show(registry, rollout_id)["counts"] == {"rolled_back": 5, "pending": 5}


def test_a_retry_is_not_failed_by_the_result_of_the_attempt_before_it(setup):
    registry, controller, public, _ = setup
    fleet = FakeFleet(registry, public, 3, fail={"d000"})
    again = rollouts.start(registry, "m", "1.1.0", {"devices": ["d000"]},
                           {"stages": [{"percent": 100.0}], "soak_s": 0, "retries": 2}, {"max_failure_pct": 100})
    _run(controller, fleet, ticks=12)
    assert _offers_of(registry, again) == 3 and _show(registry, again)["counts"] == {"failed": 1}


def _offers_of(registry, rollout_id):
    from sqlalchemy import func, select

    from edgepack.fleet.db import desired

    with registry.engine.connect() as db:
        return db.execute(select(func.count()).select_from(desired).where(desired.c.rollout == rollout_id)
                          .where(desired.c.purpose == "offer")).scalar_one()


def test_concurrent_signers_never_take_the_same_desired_state_version(tmp_path):
    """Eight writers (as two controllers and a `fleet push` would) each reserve a number and record a
    desired state under it, on one SQLite file: every number is taken once, none is lost to a lock."""
    import threading

    from edgepack.fleet.db import desired, open_engine
    from edgepack.fleet.rollouts import next_desired_version

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    open_engine(url)
    errors, taken = [], []

    def sign_many(worker: int) -> None:
        engine = open_engine(url)  # its own engine and connection, as another process has
        try:
            for _ in range(15):
                with engine.begin() as db:
                    number = next_desired_version(db)
                    db.execute(desired.insert().values(topic=f"t/{worker}", desired_version=number, model="m",
                                                       version="1.0.0", purpose="offer", payload="{}"))
                taken.append(number)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=sign_many, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]
    assert sorted(taken) == list(range(1, 8 * 15 + 1))
    engine = open_engine(url)
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):  # the backstop: the same number twice is refused by the database
        with engine.begin() as db:
            db.execute(desired.insert().values(topic="t/x", desired_version=3, model="m", version="1.0.0",
                                               purpose="push", payload="{}"))


@pytest.fixture(params=["sqlite", "postgresql"])
def any_registry(request, tmp_path):
    """A registry on SQLite, and on a real PostgreSQL when one can be started (else skipped)."""
    if request.param == "sqlite":
        yield FleetRegistry(f"sqlite:///{tmp_path / 'fleet.db'}")
        return
    from tests.integration.postgres import Postgres

    database = Postgres()
    try:
        yield FleetRegistry(database.url)
    finally:
        database.stop()


def test_late_states_and_wills_do_not_overwrite_what_came_after(any_registry):
    """States stored out of order (two controllers with --share all): an older state of the same boot
    is ignored, any state of a new boot wins (its clock may be behind), a will applies only to its own
    boot; a garbage ts is never stored (PostgreSQL casts it)."""
    registry = any_registry

    def state(boot, ts, version, online=True):
        return ("d1", "state", {"device": "d1", "boot": boot, "ts": ts, "online": online, "profile": "x86-64",
                                "models": {"m": {"active": version}}})

    def will(boot=None):
        return ("d1", "state", {"device": "d1", "online": False, **({"boot": boot} if boot else {})})

    def row():
        (found,) = [r for r in registry.devices() if r["device"] == "d1"]
        return found["online"], found["state"]["models"]["m"]["active"]

    registry.store_batch([state("A", 10.0, "1.1.0")])
    registry.store_batch([state("A", 5.0, "1.0.0")])  # older, same boot: ignored
    assert row() == (True, "1.1.0")
    registry.store_batch([will("A")])
    assert row() == (False, "1.1.0")
    registry.store_batch([state("B", 3.0, "1.1.0")])  # a new boot with its clock behind: taken
    assert row() == (True, "1.1.0")
    registry.store_batch([will("A")])  # the will of the boot before, late: ignored
    assert row() == (True, "1.1.0")
    registry.store_batch([state("B", "soon", "1.2.0")])  # no usable ts: stored as it comes, without it
    assert row() == (True, "1.2.0")
    registry.store_batch([state("B", 4.0, "1.2.1")])
    assert row() == (True, "1.2.1")
    registry.store_batch([will()])  # an older agent's will (no boot): applies
    assert row() == (False, "1.2.1")


def test_boot_numbers_order_states_of_two_boots(any_registry):
    """A state the old boot left queued (a restarted controller's backlog drained after the new boot's
    retained state) does not take the device back; a re-flashed device (its boot count starts again,
    its clock is right) is not stuck."""
    registry = any_registry

    def store(boot, boot_n, ts, version, store="s1"):
        registry.store_batch([("d2", "state", {"device": "d2", "boot": boot, "boot_n": boot_n, "boot_store": store,
                                               "ts": ts, "online": True, "profile": "x86-64",
                                               "models": {"m": {"active": version}}})])
        (found,) = [r for r in registry.devices() if r["device"] == "d2"]
        return found["state"]["models"]["m"]["active"]

    assert store("C", 5, 100.0, "1.0.0") == "1.0.0"
    assert store("D", 6, 50.0, "1.1.0") == "1.1.0"  # the next boot, its clock behind: taken by its number
    assert store("C", 5, 101.0, "1.0.0") == "1.1.0"  # the old boot's backlog, late, its clock ahead: dropped
    assert store("D", 6, 300.0, "1.2.0") == "1.2.0"
    assert store("C", 5, 150.0, "1.0.0") == "1.2.0"
    assert store("E", 1, 20.0, "2.0.0", store="s2") == "2.0.0"  # re-flashed: a new count under a new id
    assert store("F", 2 ** 40, 30.0, "2.1.0", store="s2") == "2.1.0"  # a number past 32 bits: not compared
    assert store("G", 2, 40.0, "2.2.0", store="s2") == "2.2.0"  # and it breaks nothing after it


def test_a_pending_abort_is_never_replaced_and_pause_resume_cancel_out(setup):
    registry, controller, public, _ = setup
    fleet = FakeFleet(registry, public, 4)
    rollout_id = rollouts.start(registry, "m", "1.1.0", {"group": "all"},
                                {"stages": rollouts.parse_stages("1,100%"), "soak_s": 3600}, {})
    rollouts.request(registry, rollout_id, "pause")
    rollouts.request(registry, rollout_id, "resume")  # before the tick: they cancel out
    assert _show(registry, rollout_id)["requested"] is None
    _run(controller, fleet, ticks=2)
    assert _show(registry, rollout_id)["state"] == "running"
    rollouts.request(registry, rollout_id, "pause")
    stale = _show(registry, rollout_id)  # what a tick read before the abort came in
    rollouts.request(registry, rollout_id, "abort")
    with pytest.raises(UsageError, match="an abort is requested"):
        rollouts.request(registry, rollout_id, "pause")
    assert rollouts._apply_request(registry, stale, time.time()) is False  # the tick's pause lost the race
    assert _show(registry, rollout_id)["requested"] == "abort"
    _run(controller, fleet, ticks=2)
    assert _show(registry, rollout_id)["state"] == "aborted"
    assert all(d["active"] == "1.0.0" for d in fleet.devices.values())
    with pytest.raises(UsageError, match="is aborted"):
        rollouts.request(registry, rollout_id, "resume")


def test_a_tick_that_outlives_its_lease_signs_nothing_more(setup):
    """Controller c1's tick stalls past its lease; c2 takes over. c1's next offer is refused inside
    its own transaction (the fence), so no device gets two desired states for one step."""
    from sqlalchemy import update

    from edgepack.fleet.db import leases

    registry, c1, public, _ = setup
    c2 = FakeController(registry, c1.signing_key, client_id="c2")
    fleet = FakeFleet(registry, public, 4)
    rollout_id = rollouts.start(registry, "m", "1.1.0", {"group": "all"}, {"stages": [{"percent": 100.0}], "soak_s": 0}, {})
    assert rollouts._hold(c1)
    rollouts.tick(c2)
    assert c2.published == []  # c1 holds the lease
    with registry.engine.begin() as db:  # c1 stalls: its lease runs out
        db.execute(update(leases).values(until=time.time() - 1))
    assert rollouts._hold(c2)
    rollout = _show(registry, rollout_id)
    member = next(m for m in rollout["members"] if m["status"] == "pending")
    with pytest.raises(rollouts.LeaseLost):
        rollouts.offer(c1, rollout, member, "1.1.0", "offer")
    assert c1.published == [] and _offers_of(registry, rollout_id) == 0
    rollouts.tick(c1)  # its next tick does not get the lease either
    assert c1.published == []
    _run(c2, fleet, ticks=5, until=lambda: _show(registry, rollout_id)["state"] == "done")
    assert _offers_of(registry, rollout_id) == 4 and all(d["active"] == "1.1.0" for d in fleet.devices.values())


def test_cohorts_and_device_lists_past_one_in_list(setup, monkeypatch):
    """A fleet larger than one ``IN (…)`` list (PostgreSQL takes 65,535 parameters): start's check and
    the tag command go in chunks; the metric cohorts are subqueries."""
    from edgepack.fleet import db as tables

    registry, controller, public, _ = setup
    monkeypatch.setattr(tables, "IN_CHUNK", 3)
    fleet = FakeFleet(registry, public, 10)
    first = rollouts.start(registry, "m", "1.1.0", {"devices": ["d009"]}, {"stages": [{"percent": 100.0}], "soak_s": 0}, {})
    with pytest.raises(UsageError, match=f"d009 is in rollout {first}"):
        rollouts.start(registry, "m", "1.1.0", {"group": "all"})  # d009 is in the last chunk
    assert len(registry.label("tags", [f"d{i:03d}" for i in range(10)], ["big"], [])) == 10
    second = rollouts.start(registry, "m", "1.1.0", {"devices": [f"d00{i}" for i in range(9)]},
                            {"stages": rollouts.parse_stages("50%,100%"), "soak_s": 0},
                            {"max_latency_ratio": 1.5, "min_requests": 10, "window_s": 600})
    scripts = {"default": {"p95": 0.01}, "1.1.0": {"p95": 0.05}}
    _run(controller, fleet, ticks=10, scripts=scripts, until=lambda: _show(registry, second)["state"] == "aborted")
    verdict = _show(registry, second)["verdicts"]["metrics"]["profiles"]["x86-64"]
    assert verdict["new"]["devices"] >= 1 and verdict["old"]["devices"] >= 1 and verdict["latency_ratio"] > 1.5


def test_a_renewal_neither_out_versions_a_group_push_nor_counts_as_a_new_try(setup, tmp_path):
    """freshen() leaves a device's state alone while a newer push to a group it follows waits for it;
    a renewal says which offer it renews, so a failure reported against the offer before it still
    answers the rollout, and an agent that failed that target does not try it again."""
    from sqlalchemy import select

    from agent.updates import record as agent_record
    from edgepack.fleet.db import desired

    registry, controller, public, _ = setup
    FakeFleet(registry, public, 3)
    rollout_id = rollouts.start(registry, "m", "1.1.0", {"devices": ["d000", "d001"]},
                                {"stages": [{"percent": 100.0}], "soak_s": 0}, {"max_failure_pct": 100})
    rollouts.tick(controller)  # offered; the devices have not answered yet
    offered = {m["device"]: m["desired_version"] for m in _show(registry, rollout_id)["members"]}
    with registry.engine.begin() as db:  # a 'fleet push --group all' of another version, newer
        db.execute(desired.insert().values(topic=topics.group_desired("all"), desired_version=offered["d001"] + 100,
                                           model="m", version="1.2.0", purpose="push", payload="{}", created=time.time()))
    later = time.time() + 13 * 3600
    assert rollouts.freshen(controller, later) == 0  # both follow group 'all': the push is newer
    with registry.engine.begin() as db:
        db.execute(desired.delete().where(desired.c.topic == topics.group_desired("all")))
    before = len(controller.published)
    assert rollouts.freshen(controller, later) == 2
    renewal = verify_desired(dict(controller.published[before:])[topics.desired("d000")], [public], now=later)
    assert renewal.renews == offered["d000"] and renewal.version > offered["d000"]
    with registry.engine.connect() as db:
        assert db.execute(select(desired.c.desired_version).where(desired.c.desired_version == renewal.version)).scalar()
    # d000's failure of the first offer arrives after the renewal: it answers the rollout
    registry.record_state("d000", {"online": True, "profile": "x86-64", "groups": ["all"], "accepts": ["renews"],
                                   "models": {"m": {
        "active": "1.0.0", "target": "1.1.0", "desired_version": offered["d000"],
        "update": {"state": "idle", "result": "rolled_back", "reason": "probation", "since": time.time()}}}})
    rollouts.tick(controller)
    assert {m["device"]: m["status"] for m in _show(registry, rollout_id)["members"]}["d000"] == "failed"
    # the agent side: a renewal of a target it failed keeps the failure (no new try); a new offer clears it
    bundle = renewal.for_profile("x86-64")
    unseen = agent_record.empty_record()  # offline through the first offer: the renewal is that offer
    unseen["failed"][bundle.sha256] = {"reason": "probation", "attempts": 1}
    agent_record.accept(unseen, topics.desired("d000"), renewal, bundle)
    assert bundle.sha256 not in unseen["failed"]
    record = agent_record.empty_record()
    record["models"]["m"] = offered["d000"]  # it took the first offer and failed it
    record["failed"][bundle.sha256] = {"reason": "probation", "attempts": 1}
    agent_record.accept(record, topics.desired("d000"), renewal, bundle)
    assert bundle.sha256 in record["failed"]
    first = verify_desired(next(p for t, p in controller.published[:before] if t == topics.desired("d000")), [public])
    agent_record.accept(record, topics.desired("d000"), first, bundle)
    assert bundle.sha256 not in record["failed"]


def test_shadow_stages_parse_and_need_a_stage_after_them():
    assert rollouts.parse_stages("shadow:10%,50%,100%") == [{"percent": 10.0, "shadow": True}, {"percent": 50.0},
                                                            {"percent": 100.0}]
    assert rollouts.parse_stages("SHADOW:3,100%")[0] == {"count": 3, "shadow": True}
    with pytest.raises(UsageError, match="stage after it"):
        rollouts.parse_stages("10%,shadow:100%")
    with pytest.raises(UsageError, match="shadow:10%"):
        rollouts.parse_stages("shadow:x")


def test_a_shadow_stage_skips_agents_without_shadow_and_aborts_when_none_can_run_it(setup):
    registry, controller, public, _ = setup
    fleet = FakeFleet(registry, public, count=10)  # agents that list only 'renews' in accepts
    rollout_id = rollouts.start(registry, "m", "1.1.0", {"group": "all"},
                                {"stages": rollouts.parse_stages("shadow:30%,100%"), "soak_s": 0})
    _run(controller, fleet, ticks=3)
    head = _show(registry, rollout_id)
    assert head["state"] == "aborted" and "no device of the stage can run the release in shadow" in head["reason"]
    assert "does not run shadow versions" in head["reason"]
    assert not controller.published  # nothing was offered: every device keeps its version
    assert {d["active"] for d in fleet.devices.values()} == {"1.0.0"}


def test_a_shadow_offer_names_the_running_version_and_the_release_as_its_shadow(setup):
    registry, controller, public, _ = setup
    fleet = FakeFleet(registry, public, count=10)
    for device in fleet.devices:
        state = registry.device(device)["state"]
        registry.record_state(device, {**state, "accepts": ["renews", "shadow"], "ts": time.time() + 1})
    rollout_id = rollouts.start(registry, "m", "1.1.0", {"group": "all"},
                                {"stages": rollouts.parse_stages("shadow:30%,100%"), "soak_s": 0})
    rollouts.tick(controller)
    offered = [verify_desired(payload, [public]) for _, payload in controller.published]
    assert len(offered) == 3
    assert all(s.model.version == "1.0.0" and s.shadow.version == "1.1.0" and s.probation is None for s in offered)
    assert all(list(s.shadow.bundles) == list(s.bundles) for s in offered)
    members = {m["device"]: m for m in _show(registry, rollout_id)["counts"] and rollouts.summary(registry, rollout_id)[0]["members"]}
    assert sum(m["status"] == "shadow_offered" for m in members.values()) == 3
    # the devices never report a shadow running: an abort stops the offered ones
    rollouts.request(registry, rollout_id, "abort")
    rollouts.tick(controller)
    stopped = [verify_desired(payload, [public]) for _, payload in controller.published[3:]]
    assert len(stopped) == 3 and all(s.shadow is None and s.model.version == "1.0.0" for s in stopped)
    statuses = {m["status"] for m in rollouts.summary(registry, rollout_id)[0]["members"]}
    assert statuses == {"shadow_ended", "pending"}


def test_promoted_shadow_devices_get_their_shadow_stopped_when_the_rollout_is_aborted_before_their_offer(setup):
    registry, controller, public, _ = setup
    fleet = FakeFleet(registry, public, count=10)
    for device in fleet.devices:
        registry.record_state(device, {**registry.device(device)["state"], "accepts": ["renews", "shadow"],
                                       "ts": time.time() + 1})
    rollout_id = rollouts.start(registry, "m", "1.1.0", {"group": "all"},
                                {"stages": rollouts.parse_stages("shadow:30%,100%"), "soak_s": 0},
                                {"min_shadow_samples": 50})
    rollouts.tick(controller)
    shadowed = [topic.split("/")[3] for topic, _ in controller.published]
    for seq, device in enumerate(shadowed):  # each reports the shadow running and agreeing
        state = registry.device(device)["state"]
        state["models"]["m"]["shadow"] = {"version": "1.1.0", "state": "running", "fleet": True}
        registry.record_state(device, {**state, "ts": time.time() + 2})
        registry.record_message(device, {"kind": "telemetry", "boot": "b", "seq": 1000 + seq, "ts": time.time(),
                                         "models": {"m": {"version": "1.0.0", "requests": {"ok": 30}, "shadow": {
                                             "version": "1.1.0", "active": "1.0.0", "state": "running", "agreement": 1.0,
                                             "outputs": {"y": {"samples": 30}}}}}})
    rollouts.tick(controller)  # shadowing, judged (soak 0): passed, promoted; the next tick would offer the release
    head = rollouts.summary(registry, rollout_id)[0]
    assert head["verdicts"]["shadow"]["decision"] == "pass" and head["stage"] == 1, head["verdicts"]
    assert {m["status"] for m in head["members"] if m["device"] in shadowed} == {"shadow_passed"}
    rollouts.request(registry, rollout_id, "pause")
    rollouts.tick(controller)
    rollouts.request(registry, rollout_id, "abort")
    before = len(controller.published)
    rollouts.tick(controller)
    stopped = {topic.split("/")[3]: verify_desired(payload, [public]) for topic, payload in controller.published[before:]}
    assert set(stopped) == set(shadowed) and all(s.shadow is None and s.model.version == "1.0.0" for s in stopped.values())
    assert {m["status"] for m in rollouts.summary(registry, rollout_id)[0]["members"] if m["device"] in shadowed} == {
        "shadow_ended"}
