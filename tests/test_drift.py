"""On-device drift scores: the tests, their false-alarm rate and detection, and older bundles."""

from __future__ import annotations

import numpy as np
import pytest

from agent.drift import DriftMonitor, drift_reference, psi
from agent.drift.features import input_kind
from agent.drift.stattests import chi2_sf, g_test, ks_test
from converters.stats import dataset_stats


def _reference(inputs, outputs=None, kinds=None):
    return dataset_stats(inputs, "test", outputs, inputs, kinds)


def _alarms(monitor) -> set[str]:
    return {label for label, test in monitor.scores()["tests"].items() if test and test["alarm"]}


def test_ks_p_values_hold_their_level_and_fall_on_a_shift():
    rng = np.random.default_rng(0)
    reference = np.sort(rng.normal(size=200))
    same = [ks_test(reference, 200, rng.normal(size=100))[1] for _ in range(300)]
    assert np.mean(np.asarray(same) < 0.05) <= 0.08  # the asymptotic p-value is (slightly) conservative
    assert ks_test(reference, 200, rng.normal(0.5, 1, 100))[1] < 1e-3


def test_chi2_survival_matches_known_values():
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, abs=1e-3)
    assert chi2_sf(5.991, 2) == pytest.approx(0.05, abs=1e-3)
    assert chi2_sf(18.307, 10) == pytest.approx(0.05, abs=3e-3)


def test_a_thousand_classes_seen_once_are_not_a_thousand_changes():
    """The false alarm of PSI over class counts: 50 reference samples, a 100-sample window, 1000 classes."""
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 1000, 150)
    reference, live = np.bincount(classes[:50], minlength=1000), np.bincount(classes[50:], minlength=1000)
    assert psi(reference, live) > 1.0  # what the old score said
    statistic, p, categories = g_test(reference, live)
    assert p == 1.0 and categories < 2  # too few of each class to tell: no verdict, not an alarm


def test_the_g_test_sees_a_class_taking_over():
    reference = np.array([100, 100, 100, 100])
    assert g_test(reference, np.array([25, 25, 25, 25]))[1] > 0.5
    assert g_test(reference, np.array([85, 5, 5, 5]))[1] < 1e-6


def test_tabular_inputs_and_class_scores_calm_then_shifted_and_the_window_slides():
    rng = np.random.default_rng(0)
    inputs = {"x": rng.normal(0, 1, (400, 16)).astype(np.float32)}
    logits = rng.normal(0, 1, (400, 4)).astype(np.float32)
    monitor = DriftMonitor(_reference(inputs, {"y": logits}, {"y": "classes"}), ["x"], ["y"], window=200)
    assert input_kind(inputs["x"])[0] == "features"
    for _ in range(20):
        monitor.observe({"x": rng.normal(0, 1, (10, 16)).astype(np.float32)}, {"y": rng.normal(0, 1, (10, 4))})
    calm = monitor.scores()
    assert calm["window_samples"] == 200 and not _alarms(monitor), calm
    for _ in range(20):  # one feature moves by one standard deviation, and one class wins far too often
        x = rng.normal(0, 1, (10, 16)).astype(np.float32)
        x[:, 3] += 1.0
        y = rng.normal(0, 1, (10, 4))
        y[:, 0] += 3.0
        monitor.observe({"x": x}, {"y": y})
    shifted = monitor.scores()
    assert shifted["window_samples"] == 200  # the calm samples slid out
    assert _alarms(monitor) == {"input:x", "prediction:y"}
    assert shifted["tests"]["input:x"]["feature"] == "feature[3]"
    assert shifted["tests"]["input:x"]["p"] < shifted["alpha"]


def test_no_verdict_below_the_minimum_count():
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(_reference({"x": rng.normal(0, 1, (300, 4))}), ["x"], [], window=200, min_samples=50)
    monitor.observe({"x": rng.normal(5, 1, (20, 4))}, None)  # far off, but only 20 samples
    test = monitor.scores()["tests"]["input:x"]
    assert test["p"] < 1e-6 and not test["alarm"]
    monitor.observe({"x": rng.normal(5, 1, (40, 4))}, None)
    assert monitor.scores()["tests"]["input:x"]["alarm"]


def _images(rng, count, brightness=0.0, blur=False, noise=0.0):
    """Smooth random 3x32x32 pictures with texture, like crops of real photos."""
    base = rng.normal(0, 1, (count, 3, 8, 8))
    images = np.repeat(np.repeat(base, 4, axis=2), 4, axis=3) + 0.3 * rng.normal(0, 1, (count, 3, 32, 32))
    if blur:
        images = (images + np.roll(images, 1, 2) + np.roll(images, 1, 3) + np.roll(images, -1, 2) + np.roll(images, -1, 3)) / 5
    return (images * (1 - brightness) - 2 * brightness + noise * rng.normal(0, 1, images.shape)).astype(np.float32)


@pytest.mark.parametrize("shift", ["under-exposure", "blur", "sensor noise"])
def test_image_statistics_see_camera_faults_and_not_normal_pictures(shift):
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(_reference({"image": _images(rng, 100)}), ["image"], [], window=100)
    assert monitor.scores_["input:image"][2].names[-1] == "sharpness"
    for _ in range(10):
        monitor.observe({"image": _images(rng, 10)}, None)
    assert not _alarms(monitor)
    kwargs = {"under-exposure": {"brightness": 0.5}, "blur": {"blur": True}, "sensor noise": {"noise": 0.5}}[shift]
    for _ in range(10):
        monitor.observe({"image": _images(rng, 10, **kwargs)}, None)
    assert _alarms(monitor) == {"input:image"}


def test_embeddings_are_compared_by_their_distance_to_the_reference_centroid():
    rng = np.random.default_rng(4)
    topic = rng.normal(0, 1, 32)

    def sentences(count, about):
        rows = about + rng.normal(0, 1.5, (count, 32))
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)
    monitor = DriftMonitor(_reference({"ids": rng.integers(0, 1000, (200, 16))}, {"e": sentences(200, topic)},
                                      {"e": "embedding"}), ["ids"], ["e"], window=100)
    for _ in range(10):
        monitor.observe({"ids": rng.integers(0, 1000, (10, 16))}, {"e": sentences(10, topic)})
    assert not _alarms(monitor)
    for _ in range(10):
        monitor.observe({"ids": rng.integers(0, 1000, (10, 16))}, {"e": sentences(10, rng.normal(0, 1, 32))})
    assert "prediction:e" in _alarms(monitor)


def test_the_false_alarm_rate_holds_over_many_windows_of_normal_traffic():
    rng = np.random.default_rng(5)
    inputs = {"x": rng.normal(0, 1, (300, 8))}
    monitor_reference = _reference(inputs, {"y": rng.normal(0, 1, (300, 5))}, {"y": "classes"})
    alarms = 0
    for _ in range(100):
        monitor = DriftMonitor(monitor_reference, ["x"], ["y"], window=100)
        monitor.observe({"x": rng.normal(0, 1, (100, 8))}, {"y": rng.normal(0, 1, (100, 5))})
        alarms += bool(_alarms(monitor))
    assert alarms <= 4  # 1% by construction; a little room for the approximations


def test_a_bundle_from_before_the_tests_scores_with_what_it_has():
    """An edgepack.stats/v1 reference: input histograms (PSI) and validation class frequencies."""
    rng = np.random.default_rng(6)
    reference = dataset_stats({"x": rng.normal(0, 1, (500, 16)).astype(np.float32)}, "test",
                              {"y": np.eye(4)[rng.integers(0, 4, 500)].astype(np.float32)})
    assert reference["schema"] == "edgepack.stats/v1" and "drift" not in reference
    monitor = DriftMonitor(reference, ["x"], ["y"], window=200)
    for _ in range(20):
        monitor.observe({"x": rng.normal(0, 1, (10, 16)).astype(np.float32)}, {"y": np.eye(4)[rng.integers(0, 4, 10)]})
    calm = monitor.scores()
    assert calm["tests"]["input:x"]["test"] == "psi" and calm["psi"]["input:x"] < 0.1
    assert calm["tests"]["prediction:y"]["test"] == "g" and not _alarms(monitor)
    for _ in range(20):
        monitor.observe({"x": rng.normal(2, 1, (10, 16)).astype(np.float32)}, {"y": np.eye(4)[np.zeros(10, int)]})
    assert _alarms(monitor) == {"input:x", "prediction:y"}
    assert monitor.ranges["x"][0] < -2  # an update's probation still gets the calibration range


def test_no_reference_statistics_means_no_monitor():
    assert not DriftMonitor({}, ["x"], ["y"]).enabled


def test_the_reference_stays_small():
    import json

    rng = np.random.default_rng(7)
    section = drift_reference({"x": rng.normal(0, 1, (5000, 64)), "image": rng.normal(0, 1, (500, 3, 32, 32))},
                              {"y": rng.normal(0, 1, (5000, 1000))}, {"y": "classes"})
    assert len(json.dumps(section)) < 120_000


def test_drift_costs_at_most_its_share_of_a_fast_model_and_still_watches_it():
    import time

    from agent.drift import monitor as monitor_module

    rng = np.random.default_rng(8)
    started = time.monotonic()  # before the monitor: its wall-time credit starts when it is made
    monitor = DriftMonitor(_reference({"x": rng.normal(0, 1, (300, 30))}), ["x"], [], window=100)
    feeds = {"x": rng.normal(0, 1, (1, 30))}
    for _ in range(3000):  # a model that runs in 2 µs: far faster than its features
        monitor.safe_observe(feeds, {}, 2e-6)
    elapsed = time.monotonic() - started
    scores = monitor.scores()
    assert 0 < scores["observed_share"] < 0.5 and monitor.observed + monitor.skipped == 3000
    # What it really spent (measured, not its running estimate, which one slow observation on a loaded
    # host inflates): the budget (5% of the runs, 1% of the wall time), overdrawn by at most the last
    # observation, which the credit still owes.
    budget = 3000 * 2e-6 * monitor_module.COST_SHARE + elapsed * monitor_module.WALL_SHARE
    owed = max(0.0, -monitor._credit)
    assert monitor.spent <= budget + owed + 1e-9 and owed < 0.05
    slow = DriftMonitor(_reference({"x": rng.normal(0, 1, (300, 30))}), ["x"], [], window=100)
    for _ in range(50):  # a 10 ms model: every run is observed
        slow.safe_observe(feeds, {}, 0.01)
    assert slow.scores()["observed_share"] == 1.0


@pytest.mark.parametrize("damage", [
    lambda r: r["drift"]["inputs"]["x"].update(quantiles=None),
    lambda r: r["drift"]["inputs"]["x"].update(count="many"),
    lambda r: r["drift"]["inputs"]["x"].update(count=float("nan")),
    lambda r: r["drift"]["inputs"]["x"].update(features=3),
    lambda r: r["drift"]["inputs"]["x"].update(quantiles=r["drift"]["inputs"]["x"]["quantiles"][:2]),
    lambda r: r["drift"]["inputs"]["x"].update(kind="image", layout="sideways"),
    lambda r: r["drift"]["outputs"]["y"].update(classes=None),
    lambda r: r["drift"]["outputs"]["y"].pop("confidence"),
    lambda r: r["drift"].update(inputs=[1, 2]),
    lambda r: r["drift"].update(false_alarm_rate="often"),
    lambda r: r["inputs"]["x"].update(histogram="flat"),
    lambda r: r["outputs"]["y"].update(classes=[1, 2]),
])
def test_a_malformed_reference_costs_its_score_never_the_model(damage):
    """A bundle's reference.json is data: a broken entry is skipped, the rest still scores, nothing raises."""
    rng = np.random.default_rng(9)
    reference = _reference({"x": rng.normal(0, 1, (200, 4))}, {"y": rng.normal(0, 1, (200, 3))}, {"y": "classes"})
    damage(reference)
    monitor = DriftMonitor(reference, ["x"], ["y"], window=100)
    for _ in range(5):
        monitor.safe_observe({"x": rng.normal(0, 1, (10, 4))}, {"y": rng.normal(0, 1, (10, 3))}, 0.01)
    monitor.safe_observe({"x": rng.normal(0, 1, (10, 7))}, {"y": rng.normal(0, 1, (10, 5))}, 0.01)  # other widths
    scores = monitor.scores()
    assert scores["errors"] == 0 and 0 < scores["false_alarm_rate"] <= 0.5
    assert any(test for test in scores["tests"].values())  # what was intact still scores


def test_false_alarm_rates_outside_zero_to_one_half_fall_back_to_the_default():
    rng = np.random.default_rng(10)
    reference = _reference({"x": rng.normal(0, 1, (200, 4))})
    for rate in (-1, 0, 1, 7):
        reference["drift"]["false_alarm_rate"] = rate
        assert DriftMonitor(reference, ["x"], []).false_alarm_rate == 0.01


def test_a_confident_classifier_fed_its_own_validation_data_does_not_alarm():
    """Atoms (confidences of exactly 1.0, binary columns) must be the same value on both sides."""
    rng = np.random.default_rng(11)
    logits = rng.normal(0, 1, (600, 10))
    logits[rng.random(600) < 2 / 3, 0] += 40.0  # two thirds of the answers are certain: confidence 1.0 in float32
    binary = (rng.random((600, 3)) < 0.3).astype(np.float32)
    binary = (binary - binary.mean(0)) / binary.std(0)  # standardized: irrational atoms
    monitor = DriftMonitor(_reference({"x": binary}, {"y": logits.astype(np.float32)}, {"y": "classes"}),
                           ["x"], ["y"], window=500)
    monitor.observe({"x": binary[:500]}, {"y": logits[:500].astype(np.float32)})
    assert not _alarms(monitor), monitor.scores()["tests"]


def test_quantile_references_hold_the_false_alarm_rate_on_large_samples():
    rng = np.random.default_rng(12)
    reference = _reference({"x": rng.normal(0, 1, (20_000, 30))})  # 65 quantiles per feature stored
    assert len(reference["drift"]["inputs"]["x"]["quantiles"][0]) == 65
    alarms = sum(bool(_alarms_of(reference, rng.normal(0, 1, (1000, 30)))) for _ in range(60))
    assert alarms <= 2


def _alarms_of(reference, x):
    monitor = DriftMonitor(reference, ["x"], [], window=1000)
    monitor.observe({"x": x}, None)
    return _alarms(monitor)


def test_statistics_of_random_inputs_are_no_reference():
    """Converted without data, the bundle's statistics describe random inputs: nothing to alarm on."""
    rng = np.random.default_rng(13)
    reference = dataset_stats({"x": rng.normal(0, 1, (32, 4))}, "random (no data given)",
                              {"y": np.eye(3)[rng.integers(0, 3, 32)]})
    assert not DriftMonitor(reference, ["x"], ["y"]).enabled
