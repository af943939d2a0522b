"""Float recipes: the optimized fp32 graph and fp16 weights/activations (float I/O kept)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from edgepack.errors import first_line

from .base import Candidate, Recipe, RecipeContext, RecipeFailed, write_atomically


class Fp32Recipe(Recipe):
    """The fp32 graph after ONNX Runtime's portable (basic) optimizations and shape inference."""

    name = "onnx-fp32"
    precision = "fp32"

    @dataclass
    class Config:
        pass

    def run(self, ctx: RecipeContext) -> Candidate:
        target = self.candidate_path(ctx, ".onnx")
        write_atomically(target, lambda partial: shutil.copyfile(ctx.base_model, partial))
        return Candidate(self.name, target, "onnx", self.precision, self.config_dict())


class Fp16Recipe(Recipe):
    """fp16 weights and activations, fp32 inputs/outputs (for GPUs with fast fp16, e.g. Jetson)."""

    name = "onnx-fp16"
    precision = "fp16"

    @dataclass
    class Config:
        keep_io_types: bool = True
        op_block_list: list | None = None

    def run(self, ctx: RecipeContext) -> Candidate:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        target = self.candidate_path(ctx, ".onnx")
        model = onnx.load(str(ctx.base_model))
        try:
            converted = convert_float_to_float16(
                model, keep_io_types=self.config.keep_io_types, op_block_list=self.config.op_block_list,
                disable_shape_infer=False,
            )
        except Exception as exc:
            raise RecipeFailed(f"fp16 conversion failed: {first_line(exc, 200)}") from None
        _sort_topologically(converted.graph)
        write_atomically(target, lambda partial: onnx.save(converted, str(partial)))
        return Candidate(self.name, target, "onnx", self.precision, self.config_dict())


def _sort_topologically(graph) -> None:
    """Reorder nodes so each comes after its inputs' producers.

    The fp16 converter appends its input Casts at the end of the node list; ONNX Runtime tolerates
    that, but the ONNX checker (and other runtimes) require topological order.
    """
    available = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    remaining = list(graph.node)
    ordered = []
    while remaining:
        progress = [node for node in remaining if all(name in available for name in node.input)]
        if not progress:
            raise RecipeFailed("fp16 conversion produced a graph with a cycle or a dangling input")
        for node in progress:
            available.update(node.output)
        ordered += progress
        done = {id(node) for node in progress}
        remaining = [node for node in remaining if id(node) not in done]
    del graph.node[:]
    graph.node.extend(ordered)
