"""Device profiles: what a target device is and which conversion recipes to try for it.

Profiles live as YAML files in ``device-profiles/`` (or the folder named by ``EDGEPACK_PROFILES_DIR``).
They are validated by the pydantic schema below; every error is reported with its file and key at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ProfileError
from .recipes import RECIPES

#: Recipe names the converters know (``edgepack.recipes`` holds their facts; ``converters.recipes``
#: maps them to classes).
KNOWN_RECIPES = tuple(RECIPES)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cpu(_Strict):
    """The CPU of a device."""

    model: str
    cores: int = Field(gt=0)
    features: list[str] = []
    int8_dot_product: bool = Field(description="SDOT/UDOT (Arm) or VNNI (x86) int8 dot-product instructions")


class Gpu(_Strict):
    """An accelerator on the device, if any."""

    model: str
    compute_capability: str | None = None
    fp16: bool = True
    int8: bool = False


class Runtime(_Strict):
    """One inference runtime available on the device."""

    name: Literal["onnxruntime", "litert"]
    min_version: str
    max_opset: int | None = Field(default=None, description="highest ONNX opset the runtime version runs")
    execution_providers: list[str] = []
    delegates: list[str] = []
    package: Literal["ai-edge-litert", "tflite-runtime"] | None = Field(
        None, description="litert only: the Python package on the device; with tflite-runtime, min_version "
        "is a TensorFlow Lite version that a .tflite file's min_runtime_version must not exceed")
    unsupported_ops: list[str] = Field(
        default=[], description="ops (optionally 'domain:Op') the device cannot run: ONNX ops the accelerated EP "
        "leaves to the CPU (an error without one), or TFLite builtin ops the device's LiteRT build lacks"
    )


class RecipeSpec(_Strict):
    """A recipe to try, with its options (e.g. calibration method, symmetric activations)."""

    name: str
    options: dict = {}

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in KNOWN_RECIPES:
            raise ValueError(f"unknown recipe {value!r}; known: {', '.join(KNOWN_RECIPES)}")
        return value


class Budgets(_Strict):
    """What a candidate must meet to ship."""

    min_agreement: float | None = Field(
        0.99, ge=0, le=1, description="top-1 agreement with the original model over all samples (null: not budgeted)")
    min_confident_agreement: float | None = Field(
        None, ge=0, le=1,
        description="top-1 agreement on the samples the original is confident about: its top-1 beats its top-2 by "
                    "more than confident_margin (null: not budgeted)")
    confident_margin: float = Field(1.0, ge=0, description="logits (log-probabilities for probability outputs)")
    min_label_agreement: float | None = Field(
        0.99, ge=0, le=1, description="label outputs (integers, strings): exact agreement with the original")
    min_neighbour_agreement: float | None = Field(
        0.8, ge=0, le=1, description="embeddings: nearest neighbour in the validation set unchanged, over all samples "
                                     "(samples whose nearest neighbour beats the next by neighbour_margin are budgeted "
                                     "by min_confident_agreement)")
    neighbour_margin: float = Field(0.05, ge=0, description="embeddings: cosine similarity")
    max_relative_error: float = Field(0.02, ge=0, description="regression outputs: mean |error| / mean |output|")
    min_cosine: float = Field(0.99, ge=-1, le=1, description="cosine similarity per output")
    min_map_iou: float = Field(0.9, ge=0, le=1, description="probability maps: IoU of the thresholded maps")
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="when labels are given")
    max_latency_ms: float | None = Field(None, gt=0, description="p50 latency on the device, if known")
    max_latency_vs_fp32: float | None = Field(
        1.0, gt=0, description="refuse a candidate slower than this ratio of fp32 on the converting host"
    )
    ship_at_latency_vs_fp32: float | None = Field(
        None, gt=0,
        description="where the host times the device (it runs the profile natively): a mixed candidate (layers kept "
                    "float) that passes slower than this ratio of fp32 lets the later int8 recipes be tried, and one "
                    "clearly faster that passes ships instead (null: the first that passes ships)")


class Profile(_Strict):
    """A device profile (DESIGN.md section 5)."""

    name: str
    description: str
    arch: Literal["aarch64", "armv7l", "x86_64"]
    cpu: Cpu
    gpu: Gpu | None = None
    memory_mb: int = Field(gt=0)
    threads: int = Field(gt=0)
    runtimes: list[Runtime] = Field(min_length=1)
    recipes: list[RecipeSpec] = Field(min_length=1)
    budgets: Budgets = Budgets()
    fallback_to_fp32: bool = Field(
        False, description="ship fp32 (with a warning) when no recipe meets the budget"
    )

    @field_validator("recipes", mode="before")
    @classmethod
    def _recipes_as_specs(cls, value):
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _recipes_have_runtime(self) -> "Profile":
        names = {runtime.name for runtime in self.runtimes}
        for index, recipe in enumerate(self.recipes):
            needed = RECIPES[recipe.name].runtime
            if needed not in names:
                raise ValueError(f"recipes.{index}: {recipe.name} needs runtime {needed!r}, not in runtimes")
        return self

    def runtime(self, name: str) -> Runtime | None:
        """The runtime entry called ``name``, or None."""
        return next((runtime for runtime in self.runtimes if runtime.name == name), None)


def profiles_dir() -> Path:
    """The folder holding the profile YAML files."""
    override = os.environ.get("EDGEPACK_PROFILES_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "device-profiles"


def validation_problems(error: ValidationError) -> list[str]:
    """Every pydantic error as ``dotted.key: message`` (shared by profiles and the agent config)."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"{key}: {item['msg'].removeprefix('Value error, ')}")
    return lines


def _format_errors(path: Path, error: ValidationError) -> list[str]:
    return [f"{path.name}: {line}" for line in validation_problems(error)]


def load_profile_file(path: Path) -> Profile:
    """Load and validate one profile file; raise ProfileError listing every problem."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path.name}: not valid YAML ({exc}); fix the file syntax") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path.name}: a profile must be a YAML mapping")
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError("; ".join(_format_errors(path, exc))) from None
    if profile.name != path.stem:
        raise ProfileError(f"{path.name}: name: {profile.name!r} must match the file name {path.stem!r}")
    return profile


def validate_all(folder: Path | None = None) -> tuple[dict[str, Profile], list[str]]:
    """Load every profile in ``folder``; return the good ones and the error lines of the bad ones."""
    folder = folder or profiles_dir()
    profiles: dict[str, Profile] = {}
    errors: list[str] = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            profiles[path.stem] = load_profile_file(path)
        except ProfileError as exc:
            errors.extend(str(exc).split("; "))
    return profiles, errors


def list_profiles(folder: Path | None = None) -> dict[str, Profile]:
    """All valid profiles by name; raise ProfileError if any profile file is invalid."""
    profiles, errors = validate_all(folder)
    if errors:
        raise ProfileError("invalid device profiles: " + "; ".join(errors))
    return profiles


def get_profile(name: str, folder: Path | None = None) -> Profile:
    """The profile called ``name``; a clear error naming the known ones otherwise."""
    folder = folder or profiles_dir()
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise ProfileError(f"unknown profile {name!r}; known profiles: {known} (see 'edgepack profiles list')")
    return load_profile_file(path)
