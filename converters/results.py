"""What ``edgepack convert`` is asked (options) and what it reports (candidate rows, profile results)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .data import ImagePreprocessing

@dataclass
class ConvertOptions:
    """Everything ``edgepack convert`` was asked to do."""

    model: str
    profiles: list[str]
    out: Path
    calibration: str | None = None
    validation: str | None = None
    input_shapes: dict = field(default_factory=dict)
    name: str | None = None
    version: str = "1.0.0"
    min_agreement: float | None = None
    #: budgets that override the profile's (e.g. {"min_confident_agreement": 1.0})
    budget_overrides: dict = field(default_factory=dict)
    #: what named outputs are (classes, embedding, regression, labels, other); detected when not named
    output_kinds: dict = field(default_factory=dict)
    recipes: list[str] | None = None
    image: ImagePreprocessing | None = None
    signing_key: Path | None = None
    try_all: bool = False
    #: keep intermediate files (every candidate model) here instead of a temporary folder
    workdir: Path | None = None
    #: for a .tflite MODEL: the original model it was made from, for the accuracy gate
    reference: str | None = None
    #: ``--batch-axis``: the axis that holds samples per input (None: a per-request constant)
    batch_axes: dict = field(default_factory=dict)
    #: ``--constant``: values of constant inputs (recorded as the defaults a request may leave out)
    constants: dict = field(default_factory=dict)
    #: ``--state``: outputs that feed an input on the next call ({output: input}); detected when empty
    state: dict = field(default_factory=dict)


@dataclass
class CandidateReport:
    """One row of the report."""

    recipe: str
    status: str  # shipped | passed | rejected | failed | skipped | not tried
    reasons: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    size_bytes: int | None = None
    size_ratio: float | None = None
    p50_ms: float | None = None
    latency_ratio: float | None = None
    metrics: dict | None = None
    details: dict = field(default_factory=dict)
    model_path: Path | None = None  # the candidate file (only while the work folder exists)

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if v not in (None, {}, []) and k != "model_path"}
        return data | {"status": self.status}


@dataclass
class ProfileResult:
    """The outcome for one profile."""

    profile: str
    bundle: Path | None = None
    chosen: str | None = None
    candidates: list[CandidateReport] = field(default_factory=list)
    coverage: dict | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"profile": self.profile, "bundle": str(self.bundle) if self.bundle else None, "chosen": self.chosen,
                "error": self.error, "notes": self.notes, "coverage": self.coverage,
                "candidates": [c.to_dict() for c in self.candidates]}
