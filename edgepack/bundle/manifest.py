"""The declared manifest schema (``edgepack.bundle/v1``): what the converter writes and what every
reader enforces before any other part of a bundle is used.

A manifest that verifies against a trusted signature can still be malformed (a buggy or hostile
builder holding a key): the agent reads nested fields such as ``runtime.threads``, ``samples`` and
their tolerances, ``batch``, and tensor shapes, so each is typed here and a bundle whose manifest does
not fit is refused with the field named. Keys this version does not know are kept (forward
compatible within the schema version); keys it knows must have the declared shape.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import BundleError
from ..tensors import ORT_TYPES

#: numpy dtype names a tensor may declare
DTYPES = frozenset(ORT_TYPES.values()) | {"object"}
MAX_RANK = 16


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Quantization(_Closed):
    """The affine mapping of an integer tensor: real = (q - zero_point) * scale."""

    scale: float = Field(gt=0)
    zero_point: int

    @field_validator("scale")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value


class TensorEntry(_Closed):
    """One model input or output: its name, numpy dtype and shape (None for a dynamic dimension)."""

    name: str = Field(min_length=1, max_length=512)
    dtype: str
    shape: list[int | None] = Field(max_length=MAX_RANK)
    quantization: Quantization | None = None
    #: the axis that holds samples (absent: 0), null for a per-request constant
    batch_axis: int | None = Field(0, ge=0, lt=MAX_RANK)

    @model_validator(mode="after")
    def _axis_in_shape(self) -> "TensorEntry":
        if self.batch_axis is not None and self.batch_axis and self.batch_axis >= len(self.shape):
            raise ValueError(f"batch_axis {self.batch_axis} is outside the tensor's rank {len(self.shape)}")
        return self

    @field_validator("dtype")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}")
        return value

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: list) -> list:
        if any(d is not None and not 0 <= d <= 2**31 for d in value):
            raise ValueError("dimensions must be between 0 and 2**31 (null: dynamic)")
        return value


class RuntimeEntry(_Open):
    """The runtime the bundle was made for and how the agent should run it."""

    name: Literal["onnxruntime", "litert"]
    min_version: str | None = None
    execution_providers: list[str] = Field(default_factory=list, max_length=16)
    delegates: list[str] = Field(default_factory=list, max_length=16)
    threads: int | None = Field(None, ge=1, le=256)


class FileEntry(_Closed):
    """Size and sha256 of one bundle member."""

    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Tolerance(_Closed):
    """How close the device's smoke-test output must be to the expected one."""

    exact: bool = False
    atol: float = Field(1e-4, ge=0, allow_inf_nan=False)
    rtol: float = Field(1e-3, ge=0, allow_inf_nan=False)


class Samples(_Closed):
    """Sample inputs and their expected outputs (files in the bundle), for the on-device smoke test."""

    count: int = Field(ge=1, le=4096)
    inputs: dict[str, str] = Field(min_length=1)
    outputs: dict[str, str]
    tolerance: dict[str, Tolerance] = Field(default_factory=dict)


class Batch(_Closed):
    """How the agent may split and merge work for this model."""

    mode: Literal["dynamic", "fixed"]
    size: int | None = Field(None, ge=1, le=65536)
    invariant: bool = True
    max_relative_deviation: float | None = Field(None, ge=0)
    #: values of constant inputs a request may leave out (a sample rate)
    constants: dict[str, float | int | bool | list] = Field(default_factory=dict, max_length=64)
    #: outputs that feed an input on the next call (output name -> input name): a stateful model
    state: dict[str, str] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _size(self) -> "Batch":
        if (self.mode == "fixed") != (self.size is not None):
            raise ValueError("size is given exactly when mode is 'fixed'")
        return self


class Manifest(_Open):
    """The typed part of ``manifest.json``."""

    schema_: str = Field(alias="schema")
    name: str
    version: str
    profile: str = Field(min_length=1, max_length=128)
    runtime: RuntimeEntry
    format: Literal["onnx", "tflite"]
    precision: str = Field(min_length=1, max_length=64)
    model_file: str
    files: dict[str, FileEntry] = Field(max_length=4096)
    inputs: list[TensorEntry] = Field(max_length=1024)
    outputs: list[TensorEntry] = Field(max_length=1024)
    samples: Samples | None = None
    batch: Batch | None = None
    reference_stats: str | None = None
    preprocessing: dict | None = None
    notes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> "Manifest":
        listed = set(self.files)
        for field, member in [("model_file", self.model_file), ("reference_stats", self.reference_stats)]:
            if member is not None and member not in listed:
                raise ValueError(f"{field} {member!r} is not among the bundle's files")
        if self.samples is not None:
            for kind in ("inputs", "outputs"):
                for tensor, member in getattr(self.samples, kind).items():
                    if member not in listed:
                        raise ValueError(f"samples.{kind}.{tensor}: {member!r} is not among the bundle's files")
            names = {tensor.name for tensor in self.inputs}
            unknown = sorted(set(self.samples.inputs) - names)
            if unknown:
                raise ValueError(f"samples.inputs names {unknown}, which the model does not take")
        if self.batch is not None:
            inputs, outputs = {t.name for t in self.inputs}, {t.name for t in self.outputs}
            if set(self.batch.constants) - inputs:
                raise ValueError(f"batch.constants names {sorted(set(self.batch.constants) - inputs)}, which the model does not take")
            for output, feeds in self.batch.state.items():
                if output not in outputs or feeds not in inputs:
                    raise ValueError(f"batch.state {output!r} -> {feeds!r} does not name an output and an input of the model")
        return self

    def to_dict(self) -> dict:
        """What ``manifest.json`` holds (``BundleWriter`` takes it): the fields that were given, under
        their JSON names (``schema``), a null only where None was given; defaults left unset stay absent."""
        return self.model_dump(by_alias=True, exclude_unset=True)


def manifest_error(exc: ValidationError) -> BundleError:
    """The BundleError for a manifest (or part of one) that does not fit the schema: the first bad field."""
    from ..profiles import validation_problems

    problems = validation_problems(exc)
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return BundleError(f"manifest.json: {problems[0]}{more}; refusing the bundle")


def check_manifest(manifest: dict) -> dict:
    """Validate ``manifest`` against the schema; return it unchanged or raise BundleError naming the
    first bad field."""
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        raise manifest_error(exc) from None
    return manifest
