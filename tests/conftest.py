"""Shared fixtures: a digits CNN trained once per session, data files, and a CLI runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))


def run_cli(*args, program="edgepack", cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run ``edgepack`` or ``edgepack-agent`` as a real process; return the completed process."""
    module = {"edgepack": "edgepack.cli", "edgepack-agent": "agent.cli"}[program]
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=600)


def invoke_each(interpreter, samples: np.ndarray) -> np.ndarray:
    """Run a LiteRT interpreter directly (no edgepack code), one sample at a time; raw outputs stacked."""
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    results = []
    for sample in samples:
        interpreter.set_tensor(inp["index"], sample[None])
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.stack(results)


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The example CNN trained on digits, saved as .pt2, with calibration/validation files."""
    import digits_cnn

    folder = tmp_path_factory.mktemp("digits")
    digits_cnn.main(folder)
    return folder


@pytest.fixture(scope="session")
def digits_module(digits):
    """The trained network (loaded back from the .pt2) to compare bundles with."""
    import torch

    return torch.export.load(str(digits / "digits_cnn.pt2")).module()


@pytest.fixture(scope="session")
def converted(digits, tmp_path_factory):
    """The digits CNN converted for x86-64 and rpi4 with every recipe tried (once per session)."""
    from converters.pipeline import ConvertOptions, convert

    out = tmp_path_factory.mktemp("bundles")
    results = convert(ConvertOptions(
        model=str(digits / "digits_cnn.pt2"), profiles=["x86-64", "rpi4"], out=out,
        calibration=str(digits / "calibration.npz"), validation=str(digits / "validation.npz"),
        name="digits", try_all=True,
    ))
    return {result.profile: result for result in results}


@pytest.fixture()
def validation_arrays(digits):
    with np.load(digits / "validation.npz") as data:
        return data["input"], data["labels"]


@pytest.fixture(scope="session")
def serving_bundles(digits, tmp_path_factory):
    """Model "digits" 1.0.0 fp32 (x86-64) and 2.0.0 int8 (rpi4), and a model "digits-int8" 0.3.0."""
    from converters.pipeline import ConvertOptions, convert

    out = tmp_path_factory.mktemp("serving-bundles")
    common = dict(model=str(digits / "digits_cnn.pt2"), out=out, calibration=str(digits / "calibration.npz"),
                  validation=str(digits / "validation.npz"), name="digits")
    (first,) = convert(ConvertOptions(profiles=["x86-64"], recipes=["onnx-fp32"], version="1.0.0", **common))
    (second,) = convert(ConvertOptions(profiles=["rpi4"], recipes=["onnx-int8-static"], version="2.0.0", **common))
    common["name"] = "digits-int8"
    (other,) = convert(ConvertOptions(profiles=["rpi4"], recipes=["onnx-int8-static"], version="0.3.0", **common))
    return first.bundle, second.bundle, other.bundle
