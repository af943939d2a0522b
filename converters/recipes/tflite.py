"""TFLite recipes: PyTorch -> ``.tflite`` with litert-torch (no TensorFlow needed).

- ``tflite-fp32``: a plain conversion.
- ``tflite-fp16``: fp16 weights (ai-edge-quantizer casts them after conversion), float compute.
- ``tflite-int8-dynamic``: int8 weights, float activations (PT2E dynamic quantization).
- ``tflite-int8``: full-integer int8 from calibration data (PT2E static, per-channel weights), so the
  model runs integer-only with XNNPACK; its inputs and outputs are int8 with a scale and zero point,
  which the manifest records and the agent's LiteRT backend applies for callers.

A model given only as ONNX, scikit-learn or TorchScript has no torch.export graph to convert: the
recipe fails with a message saying so (the ONNX recipes still run for that profile).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.errors import first_line

from ..pt2e.quantize import mark_eval, quantize_module
from ..sources import package_versions
from .base import Candidate, Recipe, RecipeContext, RecipeFailed, write_atomically

WHY_NOT = {
    "onnx": "the model was given as ONNX; litert-torch converts PyTorch programs only (an ONNX graph would "
            "need onnx2torch first, which covers few graphs): give the .pt2 / module:factory source to get TFLite",
    "sklearn": "scikit-learn models convert to ONNX only (skl2onnx); there is no TFLite path",
    "torchscript": "TorchScript cannot be re-exported with torch.export, which litert-torch needs; save the model "
                   "with torch.export.save (.pt2) or pass module:factory",
}


def example_inputs(ctx: RecipeContext):
    """One calibration sample as the tuple of tensors torch.export and litert-torch take."""
    import torch

    data = ctx.calibration.take(1)
    return tuple(torch.from_numpy(np.ascontiguousarray(array[:1])) for array in data.inputs.values())


def _lowering_error(exc: Exception) -> RecipeFailed:
    text = f"{type(exc).__name__}: {exc}"
    op = re.search(r"(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)", text)
    first = text.strip().splitlines()[0][:300]
    if op:
        return RecipeFailed(f"litert-torch cannot lower op {op.group(1)} to TFLite ({first})")
    return RecipeFailed(f"litert-torch could not convert the model: {first}")


def torch_module(ctx: RecipeContext):
    """The source's torch module in eval mode, or a RecipeFailed saying why there is none."""
    source = ctx.source
    if source is None or source.torch_module is None:
        kind = getattr(source, "kind", "unknown")
        raise RecipeFailed(f"no TFLite target: {WHY_NOT.get(kind, 'the source is not a PyTorch program')}")
    module = source.torch_module
    try:
        module.eval()
    except (NotImplementedError, RuntimeError):
        mark_eval(module)
    return module


def _quiet_litert() -> None:
    """Keep litert-torch's dependencies off the user's terminal: TensorFlow's C++ INFO lines (oneDNN),
    torchao's warnings about CUDA kernels a CPU host cannot load, and a pytree deprecation warning."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("torchao", "torch.utils._pytree", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")


def _litert_torch():
    _quiet_litert()
    try:
        import litert_torch
    except ImportError:
        raise RecipeFailed("litert-torch is not installed on this host: pip install 'edgepack[host]'") from None
    litert_torch.config.show_progress = False  # our report says what ran; its progress lines are noise
    return litert_torch


def convert_to_tflite(ctx: RecipeContext, path: Path, quantize=None) -> Path:
    """Convert the source module to ``path`` with litert-torch; ``quantize(module, example)`` returns
    (module to convert, QuantConfig or None). Lowering failures become a RecipeFailed naming the op."""
    litert_torch = _litert_torch()
    module, example = torch_module(ctx), example_inputs(ctx)
    try:
        module, quant_config = quantize(module, example) if quantize else (module, None)
        converted = litert_torch.convert(module, example, quant_config=quant_config)
    except RecipeFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - litert-torch raises many types; the report names the op
        raise _lowering_error(exc) from None
    write_atomically(path, lambda partial: converted.export(str(partial)))
    return path


class _TfliteRecipe(Recipe):
    """Shared conversion; subclasses choose the quantizer."""

    def quantize(self, module, example, ctx: RecipeContext):
        """Return (module to convert, litert QuantConfig or None)."""
        return module, None

    def run(self, ctx: RecipeContext) -> Candidate:
        path = convert_to_tflite(ctx, self.candidate_path(ctx, ".tflite"), lambda m, e: self.quantize(m, e, ctx))
        return Candidate(self.name, path, "tflite", self.precision, self.config_dict(), converter_details())


def converter_details() -> dict:
    """The converter's name and version, for the candidate's report."""
    import litert_torch

    return {"converter": f"litert-torch {litert_torch.__version__}"}


class TfliteFp32Recipe(_TfliteRecipe):
    """A float32 TFLite model."""

    name = "tflite-fp32"
    precision = "fp32"


class TfliteFp16Recipe(Recipe):
    """fp16 weights, float32 compute: half the size; LiteRT/XNNPACK widen the weights once at load.

    litert-torch converts in fp32; ai-edge-quantizer (Google's post-training quantizer for LiteRT
    models) then casts the weights of convolutions and fully connected layers to float16.
    """

    name = "tflite-fp16"
    precision = "fp16"

    def run(self, ctx: RecipeContext) -> Candidate:
        fp32 = ctx.cache.get("tflite-fp32-file")
        if fp32 is None or not Path(fp32).is_file():
            fp32 = ctx.cache["tflite-fp32-file"] = convert_to_tflite(ctx, ctx.workdir / "tflite-fp16-source.tflite")
        try:
            from ai_edge_quantizer import qtyping, quantizer, recipe_manager
            from ai_edge_quantizer.algorithm_manager import AlgorithmName
        except ImportError:
            raise RecipeFailed("ai-edge-quantizer is not installed on this host: pip install 'edgepack[host]'") from None
        recipes = recipe_manager.RecipeManager()
        recipes.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                       algorithm_key=AlgorithmName.FLOAT_CASTING)
        engine = quantizer.Quantizer(str(fp32))
        engine.load_quantization_recipe(recipes.get_quantization_recipe())
        # It prints a summary on stdout and progress bars on stderr; the report says what ran.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                result = engine.quantize()
            except Exception as exc:  # noqa: BLE001 - report the quantizer's own message
                raise RecipeFailed(f"ai-edge-quantizer could not cast the weights to fp16: {first_line(exc, 300)}") from None
        path = self.candidate_path(ctx, ".tflite")
        write_atomically(path, lambda partial: partial.write_bytes(bytes(result.quantized_model)))
        quantizer_version = package_versions("ai-edge-quantizer").get("ai-edge-quantizer", "?")
        return Candidate(self.name, path, "tflite", self.precision, self.config_dict(),
                         converter_details() | {"quantizer": f"ai-edge-quantizer {quantizer_version}"})


class TfliteInt8Recipe(_TfliteRecipe):
    """Full-integer int8 (static activations, per-channel weights), integer I/O."""

    name = "tflite-int8"
    precision = "int8"

    @dataclass
    class Config:
        per_channel: bool = True
        calibration_samples: int = 256
        #: converters.pt2e.bias_correction: undo the mean shift int8 weight rounding causes per layer
        bias_correction: bool = True

    def quantize(self, module, example, ctx):
        return quantize_module(module, example, ctx, False, self.config.per_channel, self.config.calibration_samples,
                               bias_correction=self.config.bias_correction)


class TfliteDynamicInt8Recipe(_TfliteRecipe):
    """Dynamic-range int8: int8 weights, activations quantized on the fly."""

    name = "tflite-int8-dynamic"
    precision = "int8-dynamic"

    @dataclass
    class Config:
        per_channel: bool = True

    def quantize(self, module, example, ctx):
        return quantize_module(module, example, ctx, True, self.config.per_channel, 1)
