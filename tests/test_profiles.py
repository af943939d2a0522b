"""Device profiles: the shipped ones are valid, bad ones are reported with file and key."""

from pathlib import Path

import pytest

from edgepack.errors import ProfileError
from edgepack.profiles import get_profile, list_profiles, validate_all

from .conftest import run_cli


def test_required_profiles_exist_and_validate():
    profiles = list_profiles()
    assert {"rpi4", "rpi5", "jetson-orin-nano", "jetson-nano", "x86-64"} <= set(profiles)
    assert profiles["rpi4"].cpu.int8_dot_product is False  # Cortex-A72: no SDOT/UDOT
    assert profiles["rpi5"].cpu.int8_dot_product is True  # Cortex-A76 has them
    assert profiles["rpi4"].recipes[0].name == "tflite-int8"
    assert "TensorrtExecutionProvider" in profiles["jetson-orin-nano"].runtime("onnxruntime").execution_providers


def test_every_error_reported_with_file_and_key(tmp_path: Path):
    (tmp_path / "bad.yaml").write_text(
        "name: bad\ndescription: x\narch: sparc\ncpu: {model: x, cores: 0, int8_dot_product: false}\n"
        "memory_mb: 10\nthreads: 1\nruntimes: [{name: onnxruntime, min_version: '1.17'}]\n"
        "recipes: [onnx-int9]\nsurprise: 1\n"
    )
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    profiles, errors = validate_all(tmp_path)
    assert profiles == {}
    text = "\n".join(errors)
    for expected in ("bad.yaml: arch", "bad.yaml: cpu.cores", "bad.yaml: recipes.0.name", "bad.yaml: surprise", "broken.yaml"):
        assert expected in text, text


def test_recipe_needs_its_runtime(tmp_path: Path):
    (tmp_path / "p.yaml").write_text(
        "name: p\ndescription: x\narch: x86_64\ncpu: {model: x, cores: 2, int8_dot_product: false}\n"
        "memory_mb: 10\nthreads: 1\nruntimes: [{name: onnxruntime, min_version: '1.17'}]\nrecipes: [tflite-int8]\n"
    )
    with pytest.raises(ProfileError, match="needs runtime 'litert'"):
        get_profile("p", tmp_path)


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ProfileError, match="known profiles: .*rpi4"):
        get_profile("rpi9")


def test_profiles_cli():
    listed = run_cli("profiles", "list")
    assert listed.returncode == 0 and "jetson-orin-nano" in listed.stdout
    shown = run_cli("profiles", "show", "rpi5")
    assert shown.returncode == 0 and "Cortex-A76" in shown.stdout
    missing = run_cli("profiles", "show", "nope")
    assert missing.returncode == 2 and missing.stderr.startswith("error: unknown profile")
