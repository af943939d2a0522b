"""The conversion recipes as data: what each one is, shared by the profiles (which recipe names are
valid, which runtime each needs) and the converters (``converters.recipes`` maps the same names to the
classes that build them, and a test keeps the two tables and the classes in agreement)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RecipeInfo:
    """The facts of one recipe that need no converter code."""

    name: str
    #: the runtime its candidates run on (the profile must list it)
    runtime: Literal["onnxruntime", "litert"]
    #: what the candidate computes in (``Candidate.precision``, the manifest's ``precision``)
    precision: Literal["fp32", "fp16", "int8", "int8-dynamic", "int8-mixed"]
    #: whether it calibrates activation ranges on data (static int8, and the mixed searches built on it)
    needs_calibration: bool = False


#: Every recipe, in a stable order (the order error messages list them in).
RECIPES: dict[str, RecipeInfo] = {info.name: info for info in (
    RecipeInfo("onnx-fp32", "onnxruntime", "fp32"),
    RecipeInfo("onnx-fp16", "onnxruntime", "fp16"),
    RecipeInfo("onnx-int8-dynamic", "onnxruntime", "int8-dynamic"),
    RecipeInfo("onnx-int8-static", "onnxruntime", "int8", needs_calibration=True),
    RecipeInfo("onnx-int8-mixed", "onnxruntime", "int8-mixed", needs_calibration=True),
    RecipeInfo("tflite-fp32", "litert", "fp32"),
    RecipeInfo("tflite-fp16", "litert", "fp16"),
    RecipeInfo("tflite-int8-dynamic", "litert", "int8-dynamic"),
    RecipeInfo("tflite-int8", "litert", "int8", needs_calibration=True),
    RecipeInfo("tflite-int8-mixed", "litert", "int8-mixed", needs_calibration=True),
)}


def recipe_info(name: str) -> RecipeInfo | None:
    """The recipe called ``name``, or None when there is none."""
    return RECIPES.get(name)
