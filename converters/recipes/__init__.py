"""Quantization/conversion recipes, resolved lazily by name.

Like Microsoft Olive's passes, recipes are small classes with a declared JSON-serialisable config and
one ``run``; this table maps names to ``"module:Class"`` so nothing is imported until it is used.
What a recipe is (its runtime, precision, whether it calibrates) is data in ``edgepack.recipes``, under
the same names (tests/test_recipes_table.py keeps the two tables and the classes in agreement).
"""

from __future__ import annotations

import importlib

from edgepack.errors import UsageError

RECIPES: dict[str, str | None] = {
    "onnx-fp32": "converters.recipes.onnx_float:Fp32Recipe",
    "onnx-fp16": "converters.recipes.onnx_float:Fp16Recipe",
    "onnx-int8-dynamic": "converters.recipes.onnx_int8:DynamicInt8Recipe",
    "onnx-int8-static": "converters.recipes.onnx_int8:StaticInt8Recipe",
    "onnx-int8-mixed": "converters.recipes.onnx_mixed:MixedInt8Recipe",
    # PyTorch -> TFLite with litert-torch (no TensorFlow); int8 through its PT2E quantizer.
    "tflite-fp32": "converters.recipes.tflite:TfliteFp32Recipe",
    "tflite-fp16": "converters.recipes.tflite:TfliteFp16Recipe",
    "tflite-int8-dynamic": "converters.recipes.tflite:TfliteDynamicInt8Recipe",
    "tflite-int8": "converters.recipes.tflite:TfliteInt8Recipe",
    "tflite-int8-mixed": "converters.recipes.tflite_mixed:TfliteMixedInt8Recipe",
}


def recipe_class(name: str):
    """The recipe class called ``name``, or None when this release cannot build it."""
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    target = RECIPES[name]
    if target is None:
        return None
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)
