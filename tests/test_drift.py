"""On-device drift scores (PSI) from the bundle's reference statistics."""

from __future__ import annotations

import numpy as np

from agent.drift import DriftMonitor, psi
from converters.stats import dataset_stats


def _monitor(window=200):
    rng = np.random.default_rng(0)
    inputs = {"x": rng.normal(0, 1, (500, 16)).astype(np.float32)}
    scores = np.eye(4)[rng.integers(0, 4, 500)].astype(np.float32)
    reference = dataset_stats(inputs, "test", {"y": scores})
    return DriftMonitor(reference, ["x"], ["y"], window), rng


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift():
    assert psi([10, 20, 30], [1, 2, 3]) < 1e-6
    assert psi([10, 20, 30], [30, 20, 10]) > 0.25


def test_same_data_scores_low_shifted_data_high_and_the_window_slides():
    monitor, rng = _monitor()
    for _ in range(20):
        x = rng.normal(0, 1, (10, 16)).astype(np.float32)
        monitor.observe({"x": x}, {"y": np.eye(4)[rng.integers(0, 4, 10)]})
    calm = monitor.scores()
    assert calm["window_samples"] == 200
    assert calm["psi"]["input:x"] < 0.1 and calm["psi"]["prediction:y"] < 0.1
    for _ in range(20):  # inputs shifted by 2 std, and one class predicted far too often
        monitor.observe({"x": rng.normal(2, 1, (10, 16)).astype(np.float32)}, {"y": np.eye(4)[np.zeros(10, int)]})
    shifted = monitor.scores()
    assert shifted["window_samples"] == 200  # the calm samples slid out
    assert shifted["psi"]["input:x"] > 0.25 and shifted["psi"]["prediction:y"] > 0.25


def test_no_reference_statistics_means_no_monitor():
    assert not DriftMonitor({}, ["x"], ["y"]).enabled
