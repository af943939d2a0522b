"""Mixed precision: static int8 QDQ with the layers most sensitive to quantization kept in float.

The layers are found by measurement (``converters.onnx.sensitivity``), then excluded greedily: the worst
1, 2, 4, ... layers are kept float until the candidate meets the gate, or the search gives up at half
of the quantizable layers (past that, fp16/fp32 are the better recipes).
"""

from __future__ import annotations

import hashlib

from dataclasses import dataclass

from ..onnx.sensitivity import rank_nodes
from .base import Candidate, Recipe, RecipeContext, RecipeFailed
from .onnx_int8 import StaticConfig, count_quantized, quantize_static_qdq


@dataclass
class MixedConfig(StaticConfig):
    sensitivity_samples: int = 16
    max_float_fraction: float = 0.5


class MixedInt8Recipe(Recipe):
    """Static int8 with the measured most-sensitive layers kept in float."""

    name = "onnx-int8-mixed"
    precision = "int8-mixed"
    Config = MixedConfig

    def run(self, ctx: RecipeContext) -> Candidate:
        # Named by its options: profiles sharing a base graph may ask for different ones.
        tag = hashlib.sha256(repr(sorted(self.config_dict().items())).encode()).hexdigest()[:8]
        full = ctx.workdir / f"{self.name}-{tag}-full.onnx"
        quantize_static_qdq(ctx, full, self.config)
        if count_quantized(full) == 0:
            raise RecipeFailed("nothing to quantize: the graph has no Conv/MatMul/Gemm the quantizer handles")
        batch = 1 if ctx.calibration is None else min(len(ctx.calibration), self.config.sensitivity_samples)
        batches = list(ctx.calibration_batches(batch, 1))
        # Nodes adding noise above -60 dB of the signal are candidates to keep in float.
        ranked = [item for item in rank_nodes(ctx.base_model, full, batches, ctx.workdir) if item.added_noise > 1e-6]
        if not ranked:
            raise RecipeFailed("no layer adds measurable quantization error; mixed precision cannot help")
        compute = _compute_nodes(ctx.base_model)
        limit = max(1, int(len(ranked) * self.config.max_float_fraction)) if len(ranked) > 1 else 1
        tried = []
        count = 1
        while True:
            count = min(count, limit)
            excluded = list(dict.fromkeys(name for item in ranked[:count] for name in item.group))
            if not compute - set(excluded):
                raise RecipeFailed(
                    f"keeping the sensitive layers ({', '.join(excluded)}) in float leaves no int8 layer; "
                    "a float recipe is the honest choice"
                )
            target = ctx.workdir / f"{self.name}-{tag}-{count}.onnx"
            corrected = quantize_static_qdq(ctx, target, self.config, nodes_to_exclude=excluded)
            gate, latency = ctx.evaluate(target)
            tried.append({"float_layers": count, "passed": gate.passed, "failures": gate.failures[:2]})
            if gate.passed or count >= limit:
                break
            count *= 2
        details = {
            "float_layers": [{"node": item.node, "op": item.op_type, "group": item.group,
                              "added_noise_db": round(item.added_db, 2)}
                             for item in ranked[:count]],
            "search": tried,
            **corrected,
        }
        candidate = Candidate(self.name, target, "onnx", self.precision, self.config_dict(), details)
        candidate.gate, candidate.latency = gate, latency
        return candidate


def _compute_nodes(path) -> set[str]:
    """Names of the nodes that carry the model's weights and most of its time."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {node.name or f"{node.op_type}_{i}" for i, node in enumerate(graph.node)
            if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")}
