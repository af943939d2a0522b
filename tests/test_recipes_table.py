"""The recipe facts in core (``edgepack.recipes``) and the converters' name -> class table agree."""

import importlib

import pytest

from converters.recipes import RECIPES as CLASSES
from converters.recipes import recipe_class
from edgepack.profiles import KNOWN_RECIPES
from edgepack.recipes import RECIPES


def test_both_tables_name_the_same_recipes_in_the_same_order():
    assert list(CLASSES) == list(RECIPES) == list(KNOWN_RECIPES)
    assert all(name == info.name for name, info in RECIPES.items())


@pytest.mark.parametrize("name", list(CLASSES))
def test_each_class_imports_and_agrees_with_the_core_facts(name):
    target = CLASSES[name]
    if target is None:  # not buildable in this release
        pytest.skip(f"{name} has no class in this release")
    module, _, attribute = target.partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    assert cls is recipe_class(name)
    info = RECIPES[name]
    assert cls.name == name
    assert cls.precision == info.precision
    # The module a class lives in says what it builds: converters.recipes.tflite* make .tflite files.
    assert info.runtime == ("litert" if module.split(".")[-1].startswith("tflite") else "onnxruntime")
    # Static int8 calibrates activation ranges (and the mixed searches start from it); dynamic int8 and
    # float recipes do not.
    assert info.needs_calibration == (info.precision in ("int8", "int8-mixed"))


def test_candidate_files_are_named_by_recipe_and_options_and_a_failed_build_keeps_the_old_one(tmp_path):
    """Profiles sharing a base graph share its folder and reuse an earlier profile's candidate by its
    options: each recipe/options pair writes its own file, and a rebuild that fails partway leaves the
    file as it was (written beside it, renamed when complete)."""
    from types import SimpleNamespace

    from converters.recipes.base import write_atomically

    ctx = SimpleNamespace(workdir=tmp_path)
    paths = {recipe_class(name)(options).candidate_path(ctx, ".tflite")
             for name, options in [("tflite-int8", {}), ("tflite-int8", {"per_channel": False}), ("tflite-fp32", {})]}
    assert len(paths) == 3 and all(path.parent == tmp_path for path in paths)
    mixed = recipe_class("tflite-int8-mixed")()
    assert mixed.candidate_path(ctx, ".tflite", "4", "a") != mixed.candidate_path(ctx, ".tflite", "4", "b")

    target = tmp_path / "model.onnx"
    assert write_atomically(target, lambda partial: partial.write_bytes(b"good")) == 4
    def fail(partial):
        partial.write_bytes(b"half")
        raise RuntimeError("killed halfway")
    with pytest.raises(RuntimeError):
        write_atomically(target, fail)
    assert target.read_bytes() == b"good" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
