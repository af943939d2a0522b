"""The shadow's logic with fake candidates (the real daemon is in tests/integration/test_shadow_split.py):
running agreement equals the gate's, and a candidate that raises, returns NaN or hangs only counts."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from agent.config import ShadowConfig
from agent.serving.agreement import Agreement
from agent.serving.shadow import ShadowRunner
from agent.serving.split import Split, bucket
from converters.gate import compare_output


def _in_parts(reference, candidate, name, parts=7):
    agreement = Agreement([name])
    for ref, cand in zip(np.array_split(reference, parts), np.array_split(candidate, parts)):
        agreement.update({name: ref}, {name: cand})
    return agreement.summary()["outputs"][name]


@pytest.mark.parametrize("kind", ["classes", "embedding", "regression", "map", "labels", "other"])
def test_running_agreement_equals_the_gate_over_the_same_samples(kind):
    rng = np.random.default_rng(3)
    if kind == "classes":
        reference = rng.normal(0, 3, (300, 10)).astype(np.float32)
    elif kind == "embedding":
        reference = rng.normal(size=(300, 16))
        reference = (reference / np.linalg.norm(reference, axis=1, keepdims=True)).astype(np.float32)
    elif kind == "regression":
        reference = rng.normal(5, 1, (300, 1)).astype(np.float32)
    elif kind == "map":
        reference = (1 / (1 + np.exp(-rng.normal(0, 3, (12, 1, 32, 32))))).astype(np.float32)
    elif kind == "labels":
        reference = rng.integers(0, 5, 300)
    else:
        reference = rng.normal(size=(40, 3, 4, 4)).astype(np.float32)
    if kind == "labels":
        candidate = np.where(rng.random(300) < 0.1, rng.integers(0, 5, 300), reference)
    else:
        candidate = (reference + rng.normal(0, 0.3 if kind != "map" else 0.05, reference.shape)).astype(np.float32)
        if kind == "map":
            candidate = np.clip(candidate, 0, 1)
    gate = compare_output("out", reference, candidate).to_dict()
    if kind == "embedding":  # nearest-neighbour figures need every sample at once: not in a running sum
        for key in ("neighbour_agreement", "confident_agreement", "confident_samples"):
            gate.pop(key, None)
    running = _in_parts(reference, candidate, "out")
    assert running["kind"] == gate["kind"] == kind
    for key in ("top1_agreement", "confident_agreement", "confident_samples", "cosine", "relative_error", "map_iou",
                "exact_agreement", "max_abs_error", "mean_abs_error"):
        assert (key in running) == (key in gate), key
        if key in gate:
            assert running[key] == pytest.approx(gate[key], rel=1e-9, abs=1e-12), key


def test_nonfinite_candidate_samples_disagree():
    reference = np.eye(4, dtype=np.float32) * 5
    candidate = reference.copy()
    candidate[1, 0] = np.nan
    figures = _in_parts(reference, candidate, "out", parts=2)
    assert figures["nonfinite_samples"] == 1
    assert figures["top1_agreement"] == 0.75 and figures["confident_agreement"] == 0.75
    assert figures["max_abs_error"] == float("inf")


class _Model:
    """A stand-in for LoadedModel whose run does what ``behaviour`` says."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.outputs = [SimpleNamespace(name="scores")]
        self.backend = SimpleNamespace(batched=True, count=lambda feeds: len(feeds["input"]))
        self.version = "2.0.0"
        self.runs = 0

    def run(self, feeds, max_batch=64):
        self.runs += 1
        return self.behaviour(feeds)

    def leading(self, feeds, outputs):
        return feeds, outputs


def _served(behaviour):
    model = _Model(behaviour)
    health = SimpleNamespace(observe=lambda *a: None, failed=lambda *a: None)
    return SimpleNamespace(model=model, version=model.version, health=health, retire=lambda: None)


def _offer(runner, count, scores=None):
    for index in range(count):
        if runner.wants(1):
            runner.offer({"input": np.full((1, 4), index, np.float32)}, {"scores": scores if scores is not None else np.eye(1, 3, dtype=np.float32)})


def test_a_candidate_that_raises_or_returns_nan_is_counted():
    def broken(feeds):
        if feeds["input"][0, 0] % 2:
            raise RuntimeError("candidate blew up\nsecond line")
        return {"scores": np.full((1, 3), np.nan, np.float32)}

    runner = ShadowRunner("m", _served(broken), ShadowConfig(bundle="x", cpu_share=1.0, queue=64))
    try:
        _offer(runner, 10)
        summary = _wait(lambda: runner.summary() if runner.summary()["requests"].get("compared", 0) + runner.counts["errors"] >= 10 else None)
        assert summary["requests"] == {"offered": 10, "compared": 5, "errors": 5, "nonfinite": 5}
        assert summary["last_error"] == "RuntimeError: candidate blew up"
        assert summary["outputs"]["scores"]["nonfinite_samples"] == 5 and summary["agreement"] == 0.0
    finally:
        runner.close()


def test_a_hung_candidate_drops_mirrored_work_and_the_request_path_never_waits():
    release = threading.Event()

    def hangs(feeds):
        release.wait(30)
        return {"scores": np.eye(1, 3, dtype=np.float32)}

    served = _served(hangs)
    runner = ShadowRunner("m", served, ShadowConfig(bundle="x", cpu_share=1.0, queue=2, timeout_s=0.2))
    try:
        began = time.perf_counter()
        _offer(runner, 50)
        assert time.perf_counter() - began < 0.05  # 50 offers: appends and drops, never a wait
        _wait(lambda: runner.hung)
        assert runner.summary()["state"] == "hung"
        offered, dropped = runner.counts["offered"], runner.counts["dropped"]
        assert 2 <= offered <= 4 and offered + dropped == 50
        assert not runner.wants(1)  # nothing more is mirrored while it hangs
        release.set()
        _wait(lambda: not runner.hung and runner.counts["compared"] == runner.counts["offered"])
        assert runner.wants(1)
    finally:
        release.set()
        runner.close()


def test_cpu_share_paces_the_candidate():
    def busy(feeds):
        until = time.thread_time() + 0.02
        while time.thread_time() < until:
            pass
        return {"scores": np.eye(1, 3, dtype=np.float32)}

    runner = ShadowRunner("m", _served(busy), ShadowConfig(bundle="x", cpu_share=0.25, queue=1000))
    try:
        _offer(runner, 1000)
        time.sleep(1.0)
        compared = runner.counts["compared"]
        # 20 ms of CPU a run at a quarter of a core: at most ~13 runs a second (unpaced: ~50)
        assert 4 <= compared <= 15, compared
        assert runner.summary()["cpu_share"] <= 0.3
    finally:
        runner.close()


def test_split_buckets_are_uniform_and_sticky():
    split = Split("m", SimpleNamespace(version="2"), 20)
    taken = [split.takes(f"c{i}") for i in range(20000)]
    assert abs(sum(taken) / len(taken) - 0.2) < 0.01
    assert taken[:100] == [split.takes(f"c{i}") for i in range(100)]
    assert bucket("m", "c1") != bucket("other", "c1")  # another model shuffles clients anew


def _wait(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_outputs_of_another_shape_or_missing_count_as_disagreements():
    agreement = Agreement(["labels", "gone"])
    agreement.update({"labels": np.arange(4), "gone": np.ones((4, 2))}, {"labels": np.arange(4)})
    agreement.update({"labels": np.arange(4), "gone": np.ones((4, 2))}, {"labels": np.arange(6)})
    figures = agreement.summary()["outputs"]
    assert figures["labels"]["exact_agreement"] == 0.5 and figures["labels"]["mismatched_samples"] == 4
    assert figures["gone"]["mismatched_samples"] == 8
