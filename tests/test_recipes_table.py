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
