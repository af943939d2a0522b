"""What every recipe shares: its config, the candidate it yields, and the context it runs in."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import numpy as np

from edgepack.errors import UsageError


class RecipeFailed(Exception):
    """A recipe could not build a candidate; the message says why (shown in the report)."""


@dataclass
class Candidate:
    """A model file a recipe built, with what it is and how it was made."""

    recipe: str
    path: Path
    format: str
    precision: str
    config: dict
    details: dict = field(default_factory=dict)
    #: set by a recipe that already ran the gate on its result (the mixed recipe)
    gate: Any = None
    latency: Any = None


@dataclass
class RecipeContext:
    """What a recipe may use: the fp32 base graph, calibration data, and the gate for search."""

    workdir: Path
    base_model: Path
    calibration: Any  # converters.data.Dataset, or None when no data was given
    calibration_is_real: bool
    evaluate: Callable[[Path], Any]  # runs the accuracy gate (and timing) on a model file
    cache: dict = field(default_factory=dict)
    #: the converters.sources.SourceModel (the TFLite recipes convert from its torch module)
    source: Any = None

    def calibration_batches(self, limit: int = 256, batch: int = 1):
        """Calibration feeds, ``batch`` samples at a time, at most ``limit`` samples."""
        data = self.calibration.take(limit)
        count = len(data)
        for start in range(0, count, batch):
            yield {name: np.ascontiguousarray(array) for name, array in data.slice(start, start + batch).items()}


class Recipe:
    """Base class: subclasses set ``name``, ``Config`` (a dataclass) and implement ``run``."""

    name: ClassVar[str] = ""
    precision: ClassVar[str] = ""

    @dataclass
    class Config:
        pass

    def __init__(self, options: dict | None = None):
        fields = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(options or {}) - fields)
        if unknown:
            raise UsageError(f"recipe {self.name}: unknown options {unknown}; it takes {sorted(fields) or 'none'}")
        self.config = self.Config(**(options or {}))

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def candidate_path(self, ctx: RecipeContext, suffix: str, *parts: str) -> Path:
        """Where this recipe writes a candidate file: named by the recipe and a hash of its options,
        then ``parts`` (what else its content depends on: the layers a mixed candidate keeps float).
        Profiles sharing a base graph share its folder, may ask for other options, and reuse an earlier
        profile's candidate by its options: one candidate's file must never be another's."""
        tag = hashlib.sha256(repr(sorted(self.config_dict().items())).encode()).hexdigest()[:8]
        return ctx.workdir / ("-".join([self.name, tag, *parts]) + suffix)

    def run(self, ctx: RecipeContext) -> Candidate:
        raise NotImplementedError


Written = TypeVar("Written")


def write_atomically(target: Path, write: Callable[[Path], Written]) -> Written:
    """``write(partial)`` into a file beside ``target``, then rename it to ``target``: a build that fails
    partway leaves an earlier candidate of the same name as it was (a later profile may reuse it)."""
    partial = target.with_name(f"{target.stem}.partial{target.suffix}")
    try:
        result = write(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return result
