"""Admission logic of the per-model scheduler: places held by requests whose body is still being read,
and a default queue that follows the model's speed under the current load. A stand-in model keeps
these fast; the daemon tests (tests/integration/test_overload.py) run the same paths on real models."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from agent.config import ModelConfig
from agent.serving.metrics import ServingMetrics
from agent.serving.scheduler import ModelScheduler, Overloaded, ServedVersion


class SlowDouble:
    """A model that doubles its input and takes ``seconds`` per sample; ``gate`` holds runs back."""

    batch_size = None
    batch_invariant = True
    version = "1"

    def __init__(self, seconds: float):
        self.sample_seconds = seconds  # as measured at load
        self.per_sample = seconds
        self.backend = SimpleNamespace(batched=True, count=lambda feeds: len(feeds["x"]), plain=True)
        self.mergeable = True
        self.gate = threading.Event()
        self.gate.set()

    def merge_limit(self, configured: int) -> int:
        return configured

    def leading(self, feeds, outputs):
        return feeds, outputs

    def run(self, feeds, max_batch):
        self.gate.wait(10)
        x = feeds["x"]
        threading.Event().wait(self.per_sample * len(x))
        return {"y": x * 2}

    def close(self) -> None:
        pass


def _scheduler(model, **options) -> ModelScheduler:
    scheduler = ModelScheduler("m", ModelConfig(name="m", **options), ServingMetrics())
    scheduler.swap(ServedVersion(model, None, 0.0, "k"))
    return scheduler


def _feeds(n: int = 1) -> dict:
    return {"x": np.ones((n, 2), np.float32)}


def test_requests_admitted_from_their_head_hold_a_place_until_queued_or_given_back():
    async def scenario():
        scheduler = _scheduler(SlowDouble(0.001), max_queue_size=2, batching={"enabled": False})
        first, second = scheduler.reserve(), scheduler.reserve()
        with pytest.raises(Overloaded, match="2 requests queued, max_queue_size 2"):
            scheduler.reserve()  # two bodies are being read: the queue is full before either is queued
        scheduler.unreserve(second)
        with pytest.raises(KeyError):
            scheduler.unreserve(second)  # given back twice: a bug, not a silent miscount
        second = scheduler.reserve()
        # A held place queues its request without a second check, even though the queue counts it as full.
        served = scheduler.pin()
        futures = [scheduler.submit(_feeds(), served, place=place) for place in (first, second)]
        scheduler.unpin(served)
        with pytest.raises(Overloaded):
            scheduler.submit(_feeds(), scheduler.current)  # no place: checked, and refused
        results = await asyncio.gather(*futures)
        assert [r.outputs["y"].tolist() for r in results] == [[[2.0, 2.0]]] * 2
        assert not scheduler._places
        await scheduler.close()

    asyncio.run(scenario())


def test_a_slow_upload_cannot_hold_the_queue_shut():
    async def scenario():
        scheduler = _scheduler(SlowDouble(0.001), max_queue_size=1, batching={"enabled": False})
        slow = scheduler.reserve()
        with pytest.raises(Overloaded):
            scheduler.reserve()
        slow.at -= 0.5  # its body has been arriving for longer than a place counts (place_hold_ms 500)
        quick = scheduler.reserve()  # admitted: the slow upload's place no longer counts
        served = scheduler.pin()
        queued = scheduler.submit(_feeds(), served, place=quick)
        # The slow request lost its place: when its body is finally in, it is checked like a new one.
        with pytest.raises(Overloaded):
            scheduler.submit(_feeds(), served, place=slow)
        scheduler.unpin(served)
        assert (await queued).outputs["y"].shape == (1, 2)
        assert not scheduler._places
        await scheduler.close()

    asyncio.run(scenario())


class CountingDouble(SlowDouble):
    """SlowDouble that records the samples of each run."""

    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.runs: list[int] = []

    def run(self, feeds, max_batch):
        self.runs.append(len(feeds["x"]))
        return super().run(feeds, max_batch)


def test_a_batch_waits_briefly_for_requests_admitted_from_their_head():
    async def scenario():
        # A closed loop of four clients: their heads are read together, the first body is decoded first.
        model = CountingDouble(0.004)
        scheduler = _scheduler(model, batching={"max_batch_size": 8})
        places = [scheduler.reserve() for _ in range(3)]
        served = scheduler.pin()
        futures = [scheduler.submit(_feeds(), served)]
        await asyncio.sleep(0.001)  # the other bodies are still arriving
        futures += [scheduler.submit(_feeds(), served, place=place) for place in places]
        scheduler.unpin(served)
        await asyncio.gather(*futures)
        assert model.runs == [4]  # one run, not 1 then 3

        # A place whose request never comes (refused, or a client gone) costs at most one sample's time.
        model.runs.clear()
        lost = scheduler.reserve()
        loop = asyncio.get_running_loop()
        began = loop.time()
        await scheduler.submit(_feeds(), scheduler.current)
        assert model.runs == [1] and loop.time() - began < 0.5
        scheduler.unreserve(lost)

        # A lone client (no place held) never waits for anyone.
        gathered = []
        original = scheduler._gather_held
        scheduler._gather_held = lambda: gathered.append(1) or original()
        await scheduler.submit(_feeds(), scheduler.current)
        assert gathered == [] and model.runs == [1, 1]
        await scheduler.close()

    asyncio.run(scenario())


def test_default_queue_follows_the_speed_of_recent_runs():
    async def scenario():
        scheduler = _scheduler(SlowDouble(0.0005), queue_budget_ms=25, batching={"enabled": True, "max_batch_size": 4})
        served = scheduler.current
        assert scheduler.max_queue == 50  # 25 ms at 0.5 ms per sample, as measured at load
        for _ in range(30):  # the host got ten times slower (a CPU hog, thermal throttling)
            scheduler._observe_run(served, 4, 4 * 0.005)
        # 25 ms now holds about five samples; the floor (32, and one full batch) applies.
        assert scheduler.max_queue == 32, scheduler.max_queue
        scheduler._observe_run(served, 64, 64 * 1e-6)  # a large request's chunk: not the queue's kind of run
        assert scheduler.max_queue == 32
        for _ in range(30):
            scheduler._observe_run(served, 2, 2 * 0.0002)
        assert 120 <= scheduler.max_queue <= 125, scheduler.max_queue  # it grows back when runs speed up (125)
        # A new version starts again from its own speed measured at load; the old one's runs do not count.
        scheduler.swap(ServedVersion(SlowDouble(0.001), None, 0.0, "k2"))
        scheduler._observe_run(served, 1, 1.0)
        assert scheduler.max_queue == 32  # 25 ms at 1 ms per sample: the floor
        await scheduler.close()

    asyncio.run(scenario())


def test_a_deadline_sizes_the_default_queue_and_a_closed_loop_within_it_is_never_refused():
    async def scenario():
        # 2 ms a request, a 250 ms deadline: the queue holds what the model serves in 250 ms (125 at the
        # speed measured at load), so 100 clients that each
        # wait for their answer before asking again are never refused.
        scheduler = _scheduler(SlowDouble(0.002), deadline_ms=250, batching={"enabled": False})
        assert scheduler.max_queue == 125, scheduler.max_queue
        # the speed measured at load stays the estimate: how fast this host runs the sleeps is not what
        # this test is about (a loaded CI host measures slower runs and a shorter queue)
        scheduler._observe_run = lambda *args: None
        refused = 0

        async def client():
            nonlocal refused
            for _ in range(5):
                try:
                    place = scheduler.reserve()
                except Overloaded:
                    refused += 1
                    continue
                served = scheduler.pin()
                try:
                    await scheduler.submit({"x": np.ones((1, 2), np.float32)}, served, None, None, place)
                finally:
                    scheduler.unpin(served)

        await asyncio.gather(*[client() for _ in range(100)])
        assert refused == 0, (refused, scheduler.max_queue)
        # without the deadline the 25 ms budget (floor 32) applies: the same load would be refused
        assert _scheduler(SlowDouble(0.002), batching={"enabled": False}).max_queue == 32
        await scheduler.close()

    asyncio.run(scenario())


def test_retry_after_comes_from_the_speed_of_recent_runs():
    async def scenario():
        scheduler = _scheduler(SlowDouble(0.002), queue_budget_ms=10, batching={"enabled": False})
        assert scheduler.max_queue == 32  # 10 ms is 5 samples; the floor is 32 requests
        for _ in range(30):
            scheduler._observe_run(scheduler.current, 1, 0.5)  # half a second per request now
        places = [scheduler.reserve() for _ in range(scheduler.max_queue)]
        with pytest.raises(Overloaded) as refused:
            scheduler.reserve()
        assert refused.value.retry_after == 16  # 32 requests ahead at ~0.5 s each
        for place in places:
            scheduler.unreserve(place)
        await scheduler.close()

    asyncio.run(scenario())


def test_front_door_answers_only_what_the_request_head_decides():
    from agent.config import AgentConfig
    from agent.serving.front_door import PLACE, build_front_door

    async def scenario():
        token = "front-door-unit-token-0123"
        scheduler = _scheduler(SlowDouble(0.001), max_queue_size=1, batching={"enabled": False})
        registry = SimpleNamespace(get=lambda name: scheduler if name == "m" else None, ready=True)
        door = build_front_door(AgentConfig(server={"token": token}), registry, scheduler.metrics)
        auth = [(b"authorization", f"Bearer {token}".encode())]
        assert door(b"GET", b"/v2/health/ready", []) == (200, [(b"content-type", b"application/json")], b'{"ready":true}')
        assert door(b"GET", b"/v2/health/live", [])[2] == b'{"live":true}'
        assert door(b"GET", b"/v2/models/m", auth) is None  # metadata: the application's
        assert door(b"POST", b"/v2/models/m/infer", auth) is None  # room in the queue: passed on
        # with the request's scope the door takes the place itself and leaves it there for the dataplane
        scope = {}
        assert door(b"POST", b"/v2/models/m/infer", auth, scope) is None
        owner, place = scope[PLACE]
        assert owner is scheduler and place in scheduler._places  # now the queue is full
        status, headers, body, refusal = door(b"POST", b"/v2/models/m/infer", auth, {})
        assert status == 503 and dict(headers)[b"retry-after"] == b"1" and b"max_queue_size 1" in body and refusal
        assert door(b"POST", b"/v2/models/m/versions/1/infer", auth)[0] == 503
        # Everything the application answers differently passes on: a wrong or missing token (401), an
        # unknown model or version (404), a percent-encoded name, another method or path.
        for method, path, headers in [
            (b"POST", b"/v2/models/m/infer", []),
            (b"POST", b"/v2/models/m/infer", [(b"authorization", b"Bearer wrong-token-00000000000")]),
            (b"POST", b"/v2/models/other/infer", auth),
            (b"POST", b"/v2/models/m/versions/2/infer", auth),
            (b"POST", b"/v2/models/%6d/infer", auth),
            (b"PUT", b"/v2/models/m/infer", auth),
            (b"POST", b"/v2/models/m/x/infer", auth),
        ]:
            assert door(method, path, headers) is None, (method, path)
        registry.ready = False
        assert door(b"GET", b"/v2/health/ready", []) == (503, [(b"content-type", b"application/json")], b'{"ready":false}')
        scheduler.unreserve(place)
        await scheduler.close()

    asyncio.run(scenario())


def test_predicted_classes_are_counted_along_each_outputs_samples_axis():
    from edgepack.tensors import TensorSpec

    model = SimpleNamespace(outputs=[TensorSpec("scores", "float32", (None, 3)),
                                     TensorSpec("columns", "float32", (3, None), batch_axis=1)])
    served = ServedVersion(model, None, 0.0, "key")
    served.class_outputs = ("scores", "columns")
    rows = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]], np.float32)  # classes 1 and 0
    served.count_classes({"scores": rows, "columns": rows.T})
    assert served.predictions == {1: 2, 0: 2}


def test_under_an_overload_the_default_queue_sheds_and_held_refusals_come_back_spread_out():
    async def scenario():
        scheduler = _scheduler(SlowDouble(0.002), batching={"enabled": False})  # 500 samples/s
        full = scheduler.max_queue
        assert full == 32 and scheduler.queue_limit(0) == full
        places = [scheduler.reserve() for _ in range(full)]
        with pytest.raises(Overloaded, match=f"max_queue_size {full}") as refused:
            scheduler.reserve()
        assert refused.value.scheduler is scheduler  # the door asks it how long to hold the refusal back
        # A few held clients: together with the queue no more than it holds (a closed loop of 32 clients,
        # one of them between its requests) -- no shedding, a short hold.
        for place in places[:20]:
            scheduler.unreserve(place)
        delay = scheduler.hold_refusal(0.5)
        assert 0.5 * 0.01 <= delay <= 1.5 * 0.01  # the floor: 1 / (2 x 500/s) is shorter
        assert scheduler.queue_limit(12) == full
        scheduler.refusal_released()
        # An unpaced flood: 250 clients held back. The queue sheds to shed_queue_ms (2 ms = 1 sample,
        # at least one per instance), and the holds bring the clients back at about 2x what is served.
        delays = [scheduler.hold_refusal(0.5) for _ in range(250)]
        assert scheduler.queue_limit(12) == 1
        for place in places[20:]:
            place.at = time.perf_counter()  # bodies still arriving, just admitted
        with pytest.raises(Overloaded, match="shedding to 1 of max_queue_size 32 while 250 refused clients wait"):
            scheduler.reserve()
        # While it sheds, a place counts for a few runs' time only (4 x 2 ms): bodies that trickle in
        # cannot hold the one place and leave the worker idle. A fresh place still counts.
        for place in places[20:]:
            place.at -= 0.1
        admitted = scheduler.reserve()
        with pytest.raises(Overloaded, match="shedding to 1"):
            scheduler.reserve()
        scheduler.unreserve(admitted)
        late = delays[-50:]  # held while ~200+ were: a mean of about 200-250 / 1000/s
        assert 0.1 <= sum(late) / len(late) <= 0.25 * 1.2
        assert max(late) / min(late) > 1.8  # spread, not a cohort that comes back together
        assert max(delays) <= 0.5 * 1.5  # the configured delay caps the mean
        for _ in delays:
            scheduler.refusal_released()
        assert scheduler.queue_limit(12) == full  # the flood is gone: the full queue again
        # an explicit max_queue_size is kept as it is; shed_queue_ms null keeps the full queue
        # a longer shed_queue_ms admits that much work: 11 ms = 5.5 samples
        # and the floor is one request per instance
        for options, limit in (({"max_queue_size": 40}, 40), ({"shed_queue_ms": None}, 32), ({"shed_queue_ms": 11}, 5),
                               ({"shed_queue_ms": 1, "instances": 2}, 2)):
            other = _scheduler(SlowDouble(0.002), batching={"enabled": False}, **options)
            for _ in range(100):
                other.hold_refusal(0.5)
            assert other.queue_limit(12) == limit
            await other.close()
        for place in places[20:]:
            scheduler.unreserve(place)
        await scheduler.close()

    asyncio.run(scenario())
