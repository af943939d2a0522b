"""TFLite recipes: PyTorch -> ``.tflite`` with litert-torch (no TensorFlow needed).

- ``tflite-fp32``: a plain conversion.
- ``tflite-int8-dynamic``: int8 weights, float activations (PT2E dynamic quantization).
- ``tflite-int8``: full-integer int8 from calibration data (PT2E static, per-channel weights), so the
  model runs integer-only with XNNPACK; its inputs and outputs are int8 with a scale and zero point,
  which the manifest records and the agent's LiteRT backend applies for callers.

A model given only as ONNX, scikit-learn or TorchScript has no torch.export graph to convert: the
recipe fails with a message saying so (the ONNX recipes still run for that profile).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .base import Candidate, Recipe, RecipeContext, RecipeFailed

WHY_NOT = {
    "onnx": "the model was given as ONNX; litert-torch converts PyTorch programs only (an ONNX graph would "
            "need onnx2torch first, which covers few graphs): give the .pt2 / module:factory source to get TFLite",
    "sklearn": "scikit-learn models convert to ONNX only (skl2onnx); there is no TFLite path",
    "torchscript": "TorchScript cannot be re-exported with torch.export, which litert-torch needs; save the model "
                   "with torch.export.save (.pt2) or pass module:factory",
}


def _example(ctx: RecipeContext):
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


class _TfliteRecipe(Recipe):
    """Shared conversion; subclasses choose the quantizer."""

    def quantize(self, module, example, ctx: RecipeContext):
        """Return (module to convert, litert QuantConfig or None)."""
        return module, None

    def run(self, ctx: RecipeContext) -> Candidate:
        source = ctx.source
        if source is None or source.torch_module is None:
            kind = getattr(source, "kind", "unknown")
            raise RecipeFailed(f"no TFLite target: {WHY_NOT.get(kind, 'the source is not a PyTorch program')}")
        try:
            import litert_torch
        except ImportError:
            raise RecipeFailed("litert-torch is not installed on this host: pip install 'edgepack[host]'") from None
        litert_torch.config.show_progress = False  # our report says what ran; its progress lines are noise
        example = _example(ctx)
        module = source.torch_module
        try:
            module.eval()  # a .pt2's module() comes back in training mode; litert-torch warns and keeps it
        except (NotImplementedError, RuntimeError):
            pass
        try:
            module, quant_config = self.quantize(module, example, ctx)
            converted = litert_torch.convert(module, example, quant_config=quant_config)
        except RecipeFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - litert-torch raises many types; the report names the op
            raise _lowering_error(exc) from None
        path = ctx.workdir / f"{self.name}.tflite"
        converted.export(str(path))
        return Candidate(self.name, path, "tflite", self.precision, self.config_dict(),
                         {"converter": f"litert-torch {litert_torch.__version__}"})


class TfliteFp32Recipe(_TfliteRecipe):
    """A float32 TFLite model."""

    name = "tflite-fp32"
    precision = "fp32"


def _pt2e(module, example, ctx: RecipeContext, dynamic: bool, per_channel: bool, samples: int):
    import torch
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import quantize_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=dynamic)
    )
    prepared = quantize_pt2e.prepare_pt2e(torch.export.export(module, example).module(), quantizer)
    # The exported program is specialised to batch 1: calibrate one sample at a time.
    for feeds in ctx.calibration_batches(limit=samples if not dynamic else 1, batch=1):
        prepared(*(torch.from_numpy(array) for array in feeds.values()))
    return quantize_pt2e.convert_pt2e(prepared, fold_quantize=False), quant_config.QuantConfig(pt2e_quantizer=quantizer)


class TfliteInt8Recipe(_TfliteRecipe):
    """Full-integer int8 (static activations, per-channel weights), integer I/O."""

    name = "tflite-int8"
    precision = "int8"

    @dataclass
    class Config:
        per_channel: bool = True
        calibration_samples: int = 256

    def quantize(self, module, example, ctx):
        return _pt2e(module, example, ctx, False, self.config.per_channel, self.config.calibration_samples)


class TfliteDynamicInt8Recipe(_TfliteRecipe):
    """Dynamic-range int8: int8 weights, activations quantized on the fly."""

    name = "tflite-int8-dynamic"
    precision = "int8-dynamic"

    @dataclass
    class Config:
        per_channel: bool = True

    def quantize(self, module, example, ctx):
        return _pt2e(module, example, ctx, True, self.config.per_channel, 1)
