"""Selective TFLite quantization: full-integer int8 with the most sensitive layers kept in float.

The TFLite counterpart of ``onnx-int8-mixed``: quantization points are ranked by measured noise
(``converters.pt2e.sensitivity``), then the nodes around the worst 1, 2, 4, ... points are kept float
until the candidate meets the gate, or the search gives up at ``max_float_fraction`` of the points
(past that a float recipe is the honest choice). Float regions sit between QUANTIZE/DEQUANTIZE ops in
the .tflite file, so the model's inputs and outputs stay int8 like ``tflite-int8``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import Candidate, Recipe, RecipeContext, RecipeFailed
from .mixed_search import kept_tag, search_float_layers
from ..pt2e.quantize import prepare_calibrated, quantize_module, quantizer
from .tflite import convert_to_tflite, converter_details, example_inputs, torch_module


class TfliteMixedInt8Recipe(Recipe):
    """Full int8 with the nodes around the measured noisiest quantization points kept in float."""

    name = "tflite-int8-mixed"
    precision = "int8-mixed"

    @dataclass
    class Config:
        per_channel: bool = True
        calibration_samples: int = 256
        sensitivity_samples: int = 16
        max_float_fraction: float = 0.25
        bias_correction: bool = True

    def run(self, ctx: RecipeContext) -> Candidate:
        import torch

        from ..pt2e.sensitivity import rank_points

        config = self.config
        module, example = torch_module(ctx), example_inputs(ctx)
        prepared = prepare_calibrated(module, example, quantizer(False, config.per_channel), ctx, config.calibration_samples)
        # The first calibration samples: the observers have seen them, so recording them moves nothing.
        samples = [tuple(torch.from_numpy(a) for a in feeds.values())
                   for feeds in ctx.calibration_batches(limit=config.sensitivity_samples, batch=1)]
        ranked = [item for item in rank_points(prepared, samples) if item.added_noise > 1e-6]
        if not ranked:
            raise RecipeFailed("no layer adds measurable quantization error; mixed precision cannot help")
        limit = max(1, int(len(ranked) * config.max_float_fraction))

        def build(count: int, keep: list[str]) -> Path:
            return convert_to_tflite(
                ctx, self.candidate_path(ctx, ".tflite", str(count), kept_tag(keep)),
                lambda m, e: quantize_module(m, e, ctx, False, config.per_channel, config.calibration_samples, keep,
                                             bias_correction=config.bias_correction),
            )

        found = search_float_layers(ranked, limit, build, ctx.evaluate)
        count, path, gate, latency, tried = found.count, found.path, found.gate, found.latency, found.tried
        details = converter_details() | {
            "float_layers": [{"node": item.node, "op": item.op_type, "group": item.group,
                              "sqnr_db": round(item.sqnr_out_db, 2)} for item in ranked[:count]],
            "search": tried,
        }
        candidate = Candidate(self.name, path, "tflite", self.precision, self.config_dict(), details)
        candidate.gate, candidate.latency = gate, latency
        return candidate
