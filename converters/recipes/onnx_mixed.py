"""Mixed precision: static int8 QDQ with the layers most sensitive to quantization kept in float.

The layers are found by measurement (``converters.onnx.sensitivity``), then excluded greedily: the worst
1, 2, 4, ... layers are kept float until the candidate meets the gate, or the search gives up at half
of the quantizable layers (past that, fp16/fp32 are the better recipes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgepack.errors import first_line

from ..onnx.sensitivity import rank_by_output, rank_nodes
from .base import Candidate, Recipe, RecipeContext, RecipeFailed, write_atomically
from .mixed_search import kept_tag, search_float_layers
from .onnx_int8 import StaticConfig, count_quantized, quantize_static_qdq


@dataclass
class MixedConfig(StaticConfig):
    sensitivity_samples: int = 16
    max_float_fraction: float = 0.5
    #: how layers are ranked: "output" (the error each causes at the model's outputs when quantized
    #: alone; ``rank_by_output``) or "local" (the noise each adds where it is; ``rank_nodes``)
    ranking: str = "output"
    #: samples the output-referred ranking runs per layer (one float run per layer and sample)
    output_sensitivity_samples: int = 4
    #: the operators quantized: the compute ones and the activations fused into them. Requantizing
    #: every elementwise op too (ORT's default) adds noise the exclusions cannot remove: on PP-OCRv4's
    #: detector, keeping the 24 worst layers float reaches cosine 0.989 with it and 0.993 without, and
    #: the search stops getting better as layers are added.
    op_types: tuple = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Clip")


class MixedInt8Recipe(Recipe):
    """Static int8 with the measured most-sensitive layers kept in float."""

    name = "onnx-int8-mixed"
    precision = "int8-mixed"
    Config = MixedConfig

    def run(self, ctx: RecipeContext) -> Candidate:
        config = self.config
        if config.ranking not in ("output", "local"):
            raise RecipeFailed(f"unknown ranking {config.ranking!r}; use output or local")
        full = self.candidate_path(ctx, ".onnx", "full")
        op_types = list(config.op_types) or None
        # One calibration for every candidate (the tag names the base graph's options; the folder, the base).
        cache = self.candidate_path(ctx, ".json", "calibration")
        cache.unlink(missing_ok=True)
        quantize_static_qdq(ctx, full, config, op_types=op_types, calibration_cache=cache)
        if count_quantized(full) == 0:
            raise RecipeFailed("nothing to quantize: the graph has no Conv/MatMul/Gemm the quantizer handles")
        available = 1 if ctx.calibration is None else len(ctx.calibration)
        if config.ranking == "output":
            batches = list(ctx.calibration_batches(min(available, config.output_sensitivity_samples), 1))
            try:
                ranked = rank_by_output(ctx.base_model, full, batches)
            except Exception as exc:  # noqa: BLE001 - a graph the ranking cannot rebuild fails this recipe only
                raise RecipeFailed(f"the output-referred sensitivity ranking failed: {first_line(exc, 200)}") from None
        else:
            batches = list(ctx.calibration_batches(min(available, config.sensitivity_samples), 1))
            ranked = rank_nodes(ctx.base_model, full, batches, ctx.workdir)
        # Nodes adding noise above -60 dB of the signal are candidates to keep in float.
        ranked = [item for item in ranked if item.added_noise > 1e-6]
        if not ranked:
            raise RecipeFailed("no layer adds measurable quantization error; mixed precision cannot help")
        compute = _compute_nodes(ctx.base_model)
        limit = max(1, int(len(ranked) * config.max_float_fraction)) if len(ranked) > 1 else 1
        corrected: dict[int, dict] = {}  # what bias correction did, per candidate

        def build(count: int, excluded: list[str]) -> Path:
            if not compute - set(excluded):
                raise RecipeFailed(
                    f"keeping the sensitive layers ({', '.join(excluded)}) in float leaves no int8 layer; "
                    "a float recipe is the honest choice"
                )
            target = self.candidate_path(ctx, ".onnx", str(count), kept_tag(excluded))
            corrected[count] = write_atomically(target, lambda partial: quantize_static_qdq(
                ctx, partial, config, nodes_to_exclude=excluded, op_types=op_types, calibration_cache=cache))
            return target

        found = search_float_layers(ranked, limit, build, ctx.evaluate)
        details = {
            "ranking": config.ranking,
            "float_layers": [{"node": item.node, "op": item.op_type, "group": item.group,
                              ("output_sqnr_db" if config.ranking == "output" else "added_noise_db"):
                                  round(item.sqnr_out_db if config.ranking == "output" else item.added_db, 2)}
                             for item in ranked[:found.count]],
            "search": found.tried,
            **corrected.get(found.count, {}),
        }
        candidate = Candidate(self.name, found.path, "onnx", self.precision, self.config_dict(), details)
        candidate.gate, candidate.latency = found.gate, found.latency
        return candidate


def _compute_nodes(path) -> set[str]:
    """Names of the nodes that carry the model's weights and most of its time."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {node.name or f"{node.op_type}_{i}" for i, node in enumerate(graph.node)
            if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")}
