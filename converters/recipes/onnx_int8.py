"""int8 recipes with ONNX Runtime's quantization tooling: dynamic, and static QDQ with calibration."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.errors import first_line

from .base import Candidate, Recipe, RecipeContext, RecipeFailed, write_atomically

CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")
#: calibration samples whose mean input maps drive bias correction (the mean settles long before 256)
BIAS_CORRECTION_SAMPLES = 128


def count_quantized(path: Path) -> int:
    """How many QuantizeLinear/DynamicQuantizeLinear/integer ops a graph has (0: nothing was quantized)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    integer_ops = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul"}
    return sum(node.op_type in integer_ops for node in model.graph.node)


class _Reader:
    """ORT's CalibrationDataReader over the context's calibration samples, in ranges of batches.

    ``len`` and ``set_range`` let ``quantize_static`` collect one range at a time (its
    ``CalibStridedMinMax``): the calibrator folds each range into running ranges or histograms and
    drops its activations, instead of holding every batch's activations until the end."""

    def __init__(self, ctx: RecipeContext, limit: int, batch: int):
        from onnxruntime.quantization import CalibrationDataReader

        data = ctx.calibration.take(limit)
        starts = list(range(0, len(data), batch))

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.set_range(0, len(starts))

            def __len__(self):
                return len(starts)

            def set_range(self, start_index: int, end_index: int):
                self._next, self._end = start_index, min(end_index, len(starts))

            def get_next(self):
                if self._next >= self._end:
                    return None
                start = starts[self._next]
                self._next += 1
                return {name: np.ascontiguousarray(array) for name, array in data.slice(start, start + batch).items()}

            def rewind(self):
                self.set_range(0, len(starts))

        self.reader = Reader()


#: input bytes one calibration batch of a dynamic-batch model holds at most: the calibrator exposes every
#: activation, so a batch costs hundreds of times its input (a 640x640 image: ~1 GB of activations)
CALIBRATION_BATCH_BYTES = 1 << 20
#: batches whose activations ORT's calibrator holds before it folds them into running ranges (its own
#: CalibMaxIntermediateOutputs drops them unfolded in onnxruntime 1.32, so ranges come from the reader)
CALIBRATION_HELD_BATCHES = 1


def _calibration_batch(ctx: RecipeContext) -> int:
    import onnx

    model = onnx.load(str(ctx.base_model), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    first = next((value for value in model.graph.input if value.name not in initializers), None)
    dims = first.type.tensor_type.shape.dim if first is not None else []
    # A fixed batch dimension takes exactly that many samples; a dynamic one takes small batches, one
    # sample at a time once a sample is large (the memory follows the batch, not the data set).
    if dims and dims[0].HasField("dim_value") and ctx.calibration.axes.get(first.name, 0) == 0:
        return dims[0].dim_value
    sample = sum(array.nbytes // max(1, len(ctx.calibration)) for array in ctx.calibration.inputs.values())
    return int(max(1, min(16, CALIBRATION_BATCH_BYTES // max(1, sample))))


def quantize_static_qdq(ctx: RecipeContext, target: Path, config, nodes_to_exclude: list[str] | None = None,
                        op_types: list[str] | None = None, calibration_cache: Path | None = None) -> dict:
    """Static QDQ quantization of the context's base model into ``target``; returns what bias
    correction did (for the report). ``calibration_cache``: a file where the calibrated ranges are kept
    and read back by the next call with the same model, data and options (the mixed recipe's candidates
    differ only in the layers kept float: calibrating 64 images at 640x640 once instead of per candidate)."""
    from onnxruntime.quantization import CalibrationMethod, QuantType

    if ctx.calibration is None or not ctx.calibration_is_real:
        raise RecipeFailed("static int8 needs calibration data: pass --calibration (or --validation) data")
    method = config.calibrate_method.lower()
    if method not in CALIBRATION_METHODS:
        raise RecipeFailed(f"unknown calibrate_method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    logging.getLogger("root").setLevel(logging.ERROR)  # ORT's quantizer logs per node at INFO/WARNING
    reader = _Reader(ctx, config.calibration_samples, _calibration_batch(ctx)).reader
    with tempfile.TemporaryDirectory(prefix="edgepack-ranges-") as tmp:
        if method != "minmax" and _has_calibration_cache():
            # The histogram methods: calibrated here one range of batches at a time, and handed to
            # quantize_static as its calibration cache (its own calibrator would hold every batch).
            calibration_cache = calibration_cache or Path(tmp) / "ranges.json"
            if not calibration_cache.is_file():
                _calibrate_histograms(ctx, reader, methods[method], op_types, config, calibration_cache)
        _quantize(ctx, target, config, reader, methods[method], types, nodes_to_exclude, op_types, calibration_cache)
    if config.bias_correction:
        from ..onnx.bias_correction import correct_biases

        batches = list(ctx.calibration_batches(min(config.calibration_samples, BIAS_CORRECTION_SAMPLES),
                                               _calibration_batch(ctx)))
        try:
            return {"bias_correction": correct_biases(ctx.base_model, target, target, batches)}
        except Exception as exc:  # noqa: BLE001 - target is written only at the end: it stays uncorrected
            return {"bias_correction": {"layers": 0, "error": first_line(exc, 200)}}
    return {}


def _calibrate_histograms(ctx: RecipeContext, reader, method, op_types, config, cache: Path) -> None:
    """Write the ranges of a histogram ``method`` into ``cache`` (see ``onnx.histogram_calibration``)."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    from ..onnx.histogram_calibration import calibrate_histograms

    try:
        ranges = calibrate_histograms(ctx.base_model, reader, method, op_types=list(op_types) if op_types else None,
                                      extra_options={"percentile": config.percentile},
                                      held_batches=CALIBRATION_HELD_BATCHES)
        save_tensors_data(ranges, cache)
    except Exception as exc:
        raise RecipeFailed(f"calibration failed: {first_line(exc, 200)}") from None


def _quantize(ctx: RecipeContext, target: Path, config, reader, method, types: dict, nodes_to_exclude, op_types,
              calibration_cache: Path | None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    try:
        quantize_static(
            str(ctx.base_model), str(target), reader,
            quant_format=QuantFormat.QDQ, per_channel=config.per_channel, reduce_range=config.reduce_range,
            activation_type=types[config.activation_type], weight_type=types[config.weight_type],
            calibrate_method=method, nodes_to_exclude=nodes_to_exclude or [],
            op_types_to_quantize=list(op_types) if op_types else None,
            **({"calibration_cache_path": str(calibration_cache)} if calibration_cache and _has_calibration_cache() else {}),
            extra_options={"ActivationSymmetric": config.activation_symmetric,
                           "WeightSymmetric": config.weight_symmetric,
                           "CalibPercentile": config.percentile,
                           # Running ranges: the activations of one range of batches at a time, never
                           # all. The histogram methods come calibrated the same way, in the cache.
                           **({"CalibStridedMinMax": CALIBRATION_HELD_BATCHES}
                              if method == CalibrationMethod.MinMax else {})},
        )
    except Exception as exc:
        raise RecipeFailed(f"static quantization failed: {first_line(exc, 200)}") from None


def _has_calibration_cache() -> bool:
    """Whether this onnxruntime's quantize_static takes ``calibration_cache_path`` (newer than 1.17)."""
    import inspect

    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


@dataclass
class StaticConfig:
    per_channel: bool = True
    calibrate_method: str = "minmax"
    activation_type: str = "int8"
    weight_type: str = "int8"
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    percentile: float = 99.999
    calibration_samples: int = 256
    #: 7-bit weights. x86 without VNNI multiplies uint8 activations by int8 weights with vpmaddubsw,
    #: whose int16 pair sums saturate (255*127*2 > 32767): on an AVX2 box a wide MLP's int8 cosine falls
    #: from 0.9998 to 0.98. 7-bit weights cannot overflow (ONNX Runtime's advice for non-VNNI x86).
    reduce_range: bool = False
    #: subtract the mean output shift int8 weight rounding causes from each layer's bias
    #: (converters.onnx.bias_correction); on real pretrained depthwise CNNs this is what keeps int8 faithful
    bias_correction: bool = True


class StaticInt8Recipe(Recipe):
    """Static int8 in QDQ format, calibrated on the calibration data (per-channel weights by default)."""

    name = "onnx-int8-static"
    precision = "int8"
    Config = StaticConfig

    def run(self, ctx: RecipeContext) -> Candidate:
        target = self.candidate_path(ctx, ".onnx")
        details = write_atomically(target, lambda partial: quantize_static_qdq(ctx, partial, self.config))
        if count_quantized(target) == 0:
            raise RecipeFailed("nothing to quantize: the graph has no Conv/MatMul/Gemm the quantizer handles")
        return Candidate(self.name, target, "onnx", self.precision, self.config_dict(), details)


class DynamicInt8Recipe(Recipe):
    """Dynamic int8: int8 weights, activations quantized at run time (for linear/attention-heavy models)."""

    name = "onnx-int8-dynamic"
    precision = "int8-dynamic"

    @dataclass
    class Config:
        # Per-channel weights: one scale per output column keeps a transformer's int8 MatMuls within
        # cosine 0.99 of fp32 where one scale per tensor (0.96 on MiniLM) does not, at the same speed.
        per_channel: bool = True
        weight_type: str = "int8"
        # Conv is left out: ONNX Runtime's CPU ConvInteger has no int8-weight kernel.
        op_types: tuple = ("MatMul", "Attention", "LSTM", "GRU", "Gather")
        #: 7-bit weights: the same int16 saturation as static int8 on x86 without VNNI (StaticConfig)
        reduce_range: bool = False

    def run(self, ctx: RecipeContext) -> Candidate:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        target = self.candidate_path(ctx, ".onnx")
        logging.getLogger("root").setLevel(logging.ERROR)
        try:
            write_atomically(target, lambda partial: quantize_dynamic(
                str(ctx.base_model), str(partial), per_channel=self.config.per_channel,
                reduce_range=self.config.reduce_range,
                weight_type={"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[self.config.weight_type],
                op_types_to_quantize=list(self.config.op_types),
            ))
        except Exception as exc:
            raise RecipeFailed(f"dynamic quantization failed: {first_line(exc, 200)}") from None
        if count_quantized(target) == 0:
            raise RecipeFailed(f"nothing to quantize: no {'/'.join(self.config.op_types)} ops in the graph")
        return Candidate(self.name, target, "onnx", self.precision, self.config_dict())
