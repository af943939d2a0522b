"""Every bad input to edgepack convert: one clear line, exit code 2, nothing left in --out."""

from __future__ import annotations

import os

import numpy as np
import pytest

from .conftest import run_cli


@pytest.fixture()
def out(tmp_path):
    return tmp_path / "out"


def assert_usage_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_written(out):
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_missing_model_file(out):
    assert_usage_error(run_cli("convert", "nope.onnx", "--profile", "x86-64", "--out", out), "does not exist")
    assert_nothing_written(out)


def test_unknown_model_format(tmp_path, out):
    (tmp_path / "model.h5").write_bytes(b"x")
    assert_usage_error(run_cli("convert", tmp_path / "model.h5", "--profile", "x86-64", "--out", out), "unknown model format")
    assert_nothing_written(out)


def test_not_really_onnx(tmp_path, out):
    (tmp_path / "model.onnx").write_bytes(b"garbage")
    assert_usage_error(run_cli("convert", tmp_path / "model.onnx", "--profile", "x86-64", "--out", out), "not a valid ONNX model")
    assert_nothing_written(out)


def test_unknown_profile(digits, out):
    assert_usage_error(run_cli("convert", digits / "digits_cnn.pt2", "--profile", "rpi9", "--out", out), "unknown profile", "rpi4")
    assert_nothing_written(out)


@pytest.mark.parametrize("shape, fragment", [("input=1,x,8", "malformed"), ("1,64", "malformed"), ("input=1,63", "check --input-shape")])
def test_bad_input_shape(tmp_path, shape, fragment, out):
    result = run_cli("convert", "tests.models:wide_mlp", "--input-shape", shape, "--profile", "x86-64", "--out", out)
    assert_usage_error(result, fragment)
    assert_nothing_written(out)


def test_calibration_that_does_not_match_the_model(digits, tmp_path, out):
    np.save(tmp_path / "wrong.npy", np.zeros((10, 3, 8, 8), np.float32))
    assert_usage_error(run_cli("convert", digits / "digits_cnn.pt2", "--profile", "x86-64", "--calibration",
                               tmp_path / "wrong.npy", "--out", out), "axis 1")
    np.savez(tmp_path / "wrong.npz", other=np.zeros((10, 1, 8, 8)), more=np.zeros(3))
    assert_usage_error(run_cli("convert", digits / "digits_cnn.pt2", "--profile", "x86-64", "--calibration",
                               tmp_path / "wrong.npz", "--out", out), "lacks arrays")
    assert_usage_error(run_cli("convert", digits / "digits_cnn.pt2", "--profile", "x86-64", "--calibration",
                               tmp_path / "missing.npz", "--out", out), "does not exist")
    assert_nothing_written(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; covered by the file case below")
def test_unwritable_out_dir(digits, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_usage_error(run_cli("convert", digits / "digits_cnn.pt2", "--profile", "x86-64", "--out", locked), "writable")


def test_out_is_a_file(digits, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert_usage_error(run_cli("convert", digits / "digits_cnn.pt2", "--profile", "x86-64", "--out", target), "--out")
    assert target.read_text() == "x"


def test_bad_version_and_recipe(digits, out):
    assert_usage_error(run_cli("convert", digits / "digits_cnn.pt2", "--profile", "x86-64", "--version", "v1", "--out", out), "semantic version")
    assert_usage_error(run_cli("convert", digits / "digits_cnn.pt2", "--profile", "x86-64", "--recipe", "onnx-int3", "--out", out), "unknown recipe")
    assert_nothing_written(out)


def test_out_that_cannot_be_created(digits):
    assert_usage_error(run_cli("convert", digits / "digits_cnn.pt2", "--profile", "x86-64", "--out", "/proc/edgepack/out"), "--out")
