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

from ..sources import package_versions
from .base import Candidate, Recipe, RecipeContext, RecipeFailed

#: calibration samples the bias correction averages layer inputs over (batch 1: each is one run)
BIAS_CORRECTION_SAMPLES = 64
#: of those, the samples that decide whether the correction is kept
BIAS_CHECK_SAMPLES = 16

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


def _torch_module(ctx: RecipeContext):
    """The source's torch module in eval mode, or a RecipeFailed saying why there is none."""
    source = ctx.source
    if source is None or source.torch_module is None:
        kind = getattr(source, "kind", "unknown")
        raise RecipeFailed(f"no TFLite target: {WHY_NOT.get(kind, 'the source is not a PyTorch program')}")
    module = source.torch_module
    try:
        module.eval()
    except (NotImplementedError, RuntimeError):
        _mark_eval(module)
    return module


def _mark_eval(graph_module) -> None:
    """Clear the training flag of an exported graph module (its ops were fixed at export; .eval() is
    refused), so litert-torch does not warn that the model converts in training mode."""
    for module in graph_module.modules():
        module.training = False


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
    module, example = _torch_module(ctx), _example(ctx)
    try:
        module, quant_config = quantize(module, example) if quantize else (module, None)
        converted = litert_torch.convert(module, example, quant_config=quant_config)
    except RecipeFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - litert-torch raises many types; the report names the op
        raise _lowering_error(exc) from None
    converted.export(str(path))
    return path


class _TfliteRecipe(Recipe):
    """Shared conversion; subclasses choose the quantizer."""

    def quantize(self, module, example, ctx: RecipeContext):
        """Return (module to convert, litert QuantConfig or None)."""
        return module, None

    def run(self, ctx: RecipeContext) -> Candidate:
        path = convert_to_tflite(ctx, ctx.workdir / f"{self.name}.tflite", lambda m, e: self.quantize(m, e, ctx))
        return Candidate(self.name, path, "tflite", self.precision, self.config_dict(), _converter())


def _converter() -> dict:
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
        path = ctx.workdir / f"{self.name}.tflite"
        path.write_bytes(bytes(result.quantized_model))
        quantizer_version = package_versions("ai-edge-quantizer").get("ai-edge-quantizer", "?")
        return Candidate(self.name, path, "tflite", self.precision, self.config_dict(),
                         _converter() | {"quantizer": f"ai-edge-quantizer {quantizer_version}"})


def _quantizer(dynamic: bool, per_channel: bool, keep_float=()):
    """litert-torch's PT2E quantizer; nodes named in ``keep_float`` (and patterns holding them) stay float.

    One pattern is added: a convolution followed by a clamp (ReLU6 = hardtanh(0, 6), the activation of
    MobileNet/EfficientNet-Lite) is annotated like conv + ReLU, so only the clamp's output is quantized.
    The stock quantizer quantizes the convolution's unclamped output and lets the clamp share those
    parameters: [0, 6] then gets a few dozen of the 256 int8 levels and a real pretrained CNN loses most
    of its agreement (EfficientNet-Lite0: cosine 0.83 to fp32). TFLite fuses the clamp into the
    convolution either way.
    """
    from litert_torch.quantize import pt2e_quantizer

    class SelectiveQuantizer(pt2e_quantizer.PT2EQuantizer):
        # Its own set_module_name(name, None) is not supported (it asserts), and module-name filters
        # parse dynamo-style names that torch.export does not produce: filtering by node name is exact.
        def _annotate_all_static_patterns(self, model, config, filter_fn=None):
            def keep(node):
                return node.name not in skipped and (filter_fn is None or filter_fn(node))

            if config is not None and not config.is_qat:
                _annotate_conv_clamp(model, config, keep)
            return super()._annotate_all_static_patterns(model, config, keep)

    skipped = set(keep_float)
    quantizer = SelectiveQuantizer()
    return quantizer.set_global(pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=dynamic))


#: clamps TFLite fuses into a convolution (RELU6, RELU_N1_TO_1)
_FUSED_CLAMPS = {(0.0, 6.0), (-1.0, 1.0)}


def _annotate_conv_clamp(model, config, keep) -> None:
    """Annotate conv -> hardtanh(lo, hi) as one partition whose only output quantization is the clamp's."""
    import torch
    from litert_torch.quantize import pt2e_quantizer_utils as utils

    convs = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default}
    clamps = {torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default}
    relu6 = {torch.ops.aten.relu6.default}  # F.relu6 exports as its own op, nn.ReLU6 as hardtanh
    for clamp in model.graph.nodes:
        if clamp.op != "call_function" or clamp.target not in clamps | relu6:
            continue
        if clamp.target in relu6:
            bounds = (0.0, 6.0)
        else:
            bounds = (float(clamp.args[1]) if len(clamp.args) > 1 else -1.0,
                      float(clamp.args[2]) if len(clamp.args) > 2 else 1.0)
        conv = clamp.args[0]
        if (bounds not in _FUSED_CLAMPS or getattr(conv, "op", None) != "call_function" or conv.target not in convs
                or len(conv.users) != 1):
            continue
        if conv.target == torch.ops.aten.convolution.default and len(conv.args) > 6 and conv.args[6]:
            continue  # a transposed convolution: TFLite does not fuse a clamp into it
        inputs = {conv.args[0]: utils.get_input_act_qspec(config), conv.args[1]: utils.get_weight_qspec(config)}
        partition = [clamp, conv, conv.args[1]]
        bias = conv.args[2] if len(conv.args) > 2 else None
        if isinstance(bias, torch.fx.Node):
            inputs[bias] = utils.get_bias_qspec(config)
            partition.append(bias)
        if utils._is_annotated(partition) or not all(keep(node) for node in partition):
            continue
        conv.meta["quantization_annotation"] = utils.QuantizationAnnotation(input_qspec_map=inputs, _annotated=True)
        clamp.meta["quantization_annotation"] = utils.QuantizationAnnotation(
            output_qspec=utils.get_output_act_qspec(config), _annotated=True)
        utils._mark_nodes_as_annotated(partition)


def _prepare(module, example, quantizer, ctx: RecipeContext, samples: int):
    """Export, insert observers, and calibrate on ``samples`` calibration samples."""
    import torch
    from torchao.quantization.pt2e import quantize_pt2e

    prepared = quantize_pt2e.prepare_pt2e(torch.export.export(module, example).module(), quantizer)
    # The exported program is specialised to batch 1: calibrate one sample at a time.
    for feeds in ctx.calibration_batches(limit=samples, batch=1):
        prepared(*(torch.from_numpy(array) for array in feeds.values()))
    return prepared


def _pt2e(module, example, ctx: RecipeContext, dynamic: bool, per_channel: bool, samples: int, keep_float=(),
          bias_correction: bool = False):
    import torch
    from litert_torch.quantize import quant_config
    from torchao.quantization.pt2e import quantize_pt2e

    quantizer = _quantizer(dynamic, per_channel, keep_float)
    prepared = _prepare(module, example, quantizer, ctx, 1 if dynamic else samples)
    converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    _mark_eval(converted)
    if bias_correction and not dynamic:
        from ..pt2e_bias_correction import correct_if_better

        feeds = [tuple(torch.from_numpy(a) for a in f.values())
                 for f in ctx.calibration_batches(limit=min(samples, BIAS_CORRECTION_SAMPLES), batch=1)]
        outcome = correct_if_better(converted, module, feeds, feeds[:BIAS_CHECK_SAMPLES])
        logging.getLogger(__name__).info("PT2E bias correction: %s", outcome)
    return converted, quant_config.QuantConfig(pt2e_quantizer=quantizer)


class TfliteInt8Recipe(_TfliteRecipe):
    """Full-integer int8 (static activations, per-channel weights), integer I/O."""

    name = "tflite-int8"
    precision = "int8"

    @dataclass
    class Config:
        per_channel: bool = True
        calibration_samples: int = 256
        #: converters.pt2e_bias_correction: undo the mean shift int8 weight rounding causes per layer
        bias_correction: bool = True

    def quantize(self, module, example, ctx):
        return _pt2e(module, example, ctx, False, self.config.per_channel, self.config.calibration_samples,
                     bias_correction=self.config.bias_correction)


class TfliteDynamicInt8Recipe(_TfliteRecipe):
    """Dynamic-range int8: int8 weights, activations quantized on the fly."""

    name = "tflite-int8-dynamic"
    precision = "int8-dynamic"

    @dataclass
    class Config:
        per_channel: bool = True

    def quantize(self, module, example, ctx):
        return _pt2e(module, example, ctx, True, self.config.per_channel, 1)
