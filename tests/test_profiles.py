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


@pytest.mark.parametrize("host, dot, profile, native", [
    ("x86_64", False, "x86-64", True),       # AVX2 host, AVX2 profile: its kernels are the device's
    ("x86_64", False, "x86-64-vnni", False),  # no VNNI here: judged on the reference arithmetic
    ("x86_64", True, "x86-64-vnni", True),
    ("x86_64", True, "x86-64", True),        # 7-bit weights: a VNNI host computes what AVX2 does
    ("x86_64", True, "rpi4", False),         # another architecture
    ("aarch64", False, "rpi4", True),
])
def test_which_hosts_judge_a_profile_with_their_own_kernels(monkeypatch, host, dot, profile, native):
    from converters import evaluation as pipeline  # where runs_natively lives

    monkeypatch.setattr(pipeline, "host_arch", lambda: host)
    monkeypatch.setattr(pipeline, "host_int8_dot_product", lambda: dot)
    assert pipeline.runs_natively(get_profile(profile)) is native


def test_the_avx2_profile_cannot_saturate_int16_pair_sums():
    """Without VNNI, full 8-bit weights overflow vpmaddubsw's int16 pair sums: x86-64 keeps 7 bits."""
    x86 = {recipe.name: recipe.options for recipe in get_profile("x86-64").recipes}
    assert all(x86[name].get("reduce_range") for name in ("onnx-int8-static", "onnx-int8-mixed", "onnx-int8-dynamic"))
    vnni = get_profile("x86-64-vnni")
    assert vnni.cpu.int8_dot_product and not any(r.options.get("reduce_range") for r in vnni.recipes)
