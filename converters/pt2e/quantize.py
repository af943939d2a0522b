"""PT2E quantization for the TFLite recipes: litert-torch's quantizer with a conv + clamp pattern, calibration
of the exported program, and the quantize step (with optional bias correction).

Public so the recipes (``converters.recipes.tflite``, ``converters.recipes.tflite_mixed``) and the tests share
one implementation."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..recipes.base import RecipeContext

#: calibration samples the bias correction averages layer inputs over (batch 1: each is one run)
BIAS_CORRECTION_SAMPLES = 64
#: of those, the samples that decide whether the correction is kept
BIAS_CHECK_SAMPLES = 16


def mark_eval(graph_module) -> None:
    """Clear the training flag of an exported graph module (its ops were fixed at export; .eval() is
    refused), so litert-torch does not warn that the model converts in training mode."""
    for module in graph_module.modules():
        module.training = False


def quantizer(dynamic: bool, per_channel: bool, keep_float=()):
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


def prepare_calibrated(module, example, quantizer, ctx: RecipeContext, samples: int):
    """Export, insert observers, and calibrate on ``samples`` calibration samples."""
    import torch
    from torchao.quantization.pt2e import quantize_pt2e

    prepared = quantize_pt2e.prepare_pt2e(torch.export.export(module, example).module(), quantizer)
    # The exported program is specialised to batch 1: calibrate one sample at a time.
    for feeds in ctx.calibration_batches(limit=samples, batch=1):
        prepared(*(torch.from_numpy(array) for array in feeds.values()))
    return prepared


def quantize_module(module, example, ctx: RecipeContext, dynamic: bool, per_channel: bool, samples: int, keep_float=(),
                    bias_correction: bool = False):
    """Quantize ``module`` with PT2E (static: calibrated on ``samples`` samples, optionally bias-corrected);
    returns (converted module, litert-torch QuantConfig) for ``litert_torch.convert``."""
    import torch
    from litert_torch.quantize import quant_config
    from torchao.quantization.pt2e import quantize_pt2e

    chosen = quantizer(dynamic, per_channel, keep_float)
    prepared = prepare_calibrated(module, example, chosen, ctx, 1 if dynamic else samples)
    converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    mark_eval(converted)
    if bias_correction and not dynamic:
        from .bias_correction import correct_if_better

        feeds = [tuple(torch.from_numpy(a) for a in f.values())
                 for f in ctx.calibration_batches(limit=min(samples, BIAS_CORRECTION_SAMPLES), batch=1)]
        outcome = correct_if_better(converted, module, feeds, feeds[:BIAS_CHECK_SAMPLES])
        logging.getLogger(__name__).info("PT2E bias correction: %s", outcome)
    return converted, quant_config.QuantConfig(pt2e_quantizer=chosen)
