"""``edgepack convert``: export once, then per profile try its recipes in order through the gate.

The first recipe (in the profile's order, or ``--recipe`` order) that meets the accuracy budget and
is not slower than fp32 where the profile enforces it is shipped; every candidate tried is reported
with its size, latency and metrics, and why it won or lost.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from agent.runtime import Backend, run_in_batches
from agent.drift.reference import FALSE_ALARM_RATE
from agent.runtime.cpu import host_arch, host_int8_dot_product
from agent.runtime.onnx_backend import OnnxBackend
from edgepack import __version__
from edgepack.bundle import BundleWriter, bundle_filename
from edgepack.bundle.format import is_valid_name, is_valid_semver
from edgepack.errors import ConversionError, EdgepackError, GateError, InputFileError, UsageError, first_line
from edgepack.profiles import Profile, get_profile

from . import gate as gate_module
from .coverage import check_coverage, check_tflite_coverage, tflite_min_runtime
from .data import Dataset, ImagePreprocessing, load_dataset, random_dataset
from .recipes import recipe_class
from .recipes.base import Candidate, RecipeContext, RecipeFailed
from .batching import CHECK_SAMPLES, agrees_per_sample, batch_invariance, graph_batch, set_graph_batch
from . import layout as layout_module
from .sources import SourceModel, detect_kind, file_sha256, load_source, package_versions, specs_from_onnx
from .stats import dataset_stats

log = logging.getLogger(__name__)
SAMPLE_COUNT = 4
#: input bytes the gate's runs hold at once (a batch of 64 small samples; one 640x640 image)
RUN_BATCH_BYTES = 4 << 20
#: the "recipe" of a .tflite MODEL packaged without re-conversion
AS_GIVEN = "tflite-as-given"
def runs_natively(profile: Profile) -> bool:
    """Whether this host is the profile's kind of CPU, so ONNX Runtime's kernels here compute (and time)
    what the device's do: the same architecture, and int8 dot products where the profile has them.

    Otherwise accuracy is judged on the reference arithmetic of the graph's operators and the latency
    limit is not enforced: x86 without VNNI sums int8 products in pairs that saturate in int16, which
    VNNI and an Arm core's dot products never do, and one conversion must reach one verdict on any host.
    """
    if host_arch() != profile.arch:
        return False
    return host_int8_dot_product() or not profile.cpu.int8_dot_product


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


def _progress_noop(message: str) -> None:
    log.info(message)


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {out}: {exc.strerror}; choose a writable folder") from None
    if not out.is_dir() or not os.access(out, os.W_OK):
        raise UsageError(f"--out {out} is not a writable folder; choose another")


def _default_name(model: str) -> str:
    stem = Path(model.partition(":")[2] if ":" in model and not Path(model).exists() else model).stem
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in stem).strip("-._") or "model"
    return cleaned[:128]


def convert(options: ConvertOptions, progress: Callable[[str], None] = _progress_noop) -> list[ProfileResult]:
    """Run the whole conversion; return one result per profile (bundles written for the good ones)."""
    profiles = [get_profile(name) for name in dict.fromkeys(options.profiles)]  # unknown profiles fail first
    if not profiles:
        raise UsageError("give at least one --profile (see 'edgepack profiles list')")
    name = options.name or _default_name(options.model)
    if not is_valid_name(name):
        raise UsageError(f"--name {name!r} is not valid; use letters, digits, '.', '_' and '-'")
    if not is_valid_semver(options.version):
        raise UsageError(f"--version {options.version!r} is not a semantic version such as 1.0.0")
    if options.recipes:
        for recipe in options.recipes:
            recipe_class(recipe)  # unknown recipe names fail before any work
        if detect_kind(options.model) == "tflite":
            raise UsageError("a .tflite MODEL is packaged as it is; drop --recipe (convert the original model to choose recipes)")
    _check_out(options.out)
    for data in (options.calibration, options.validation):
        if data and not Path(data).exists():  # before the export, which can take a minute
            raise InputFileError(f"data {data} does not exist; check the path")
    with tempfile.TemporaryDirectory(prefix="edgepack-convert-") as temp:
        workdir = Path(options.workdir or temp)
        workdir.mkdir(parents=True, exist_ok=True)
        progress("loading and exporting the model")
        opsets = [p.runtime("onnxruntime").max_opset for p in profiles if p.runtime("onnxruntime") and p.runtime("onnxruntime").max_opset]
        source = load_source(options.model, workdir, options.input_shapes, min(opsets) if opsets else None,
                             reference=options.reference)
        job = _Job(options, source, workdir, name, progress)
        return [job.run_profile(profile) for profile in profiles]


class _Job:
    """State shared by the profiles of one conversion (data, reference outputs, candidate cache)."""

    def __init__(self, options: ConvertOptions, source: SourceModel, workdir: Path, name: str, progress):
        self.options, self.source, self.workdir, self.name, self.progress = options, source, workdir, name, progress
        self.notes = list(source.notes)
        self.axes: dict[str, int | None] = {}
        self.state: dict[str, str] = dict(options.state)
        self._settle_input_axes()
        progress("loading calibration and validation data")
        constants = options.constants
        self.calibration = load_dataset(options.calibration, source.inputs, options.image, constants) if options.calibration else None
        self.validation = load_dataset(options.validation, source.inputs, options.image, constants) if options.validation else self.calibration
        self.real_data = self.validation is not None
        #: judge ONNX accuracy on the operators' reference arithmetic (set per profile: runs_natively)
        self.reference_arithmetic = False
        if self.validation is None:
            self.validation = random_dataset(source.inputs, constants=constants, shapes=options.input_shapes,
                                             zeros=tuple(self.state.values()))
            if source.kind != "tflite":
                self.notes.append("no --calibration/--validation data: int8 recipes skipped, float recipes checked on random inputs")
        self._settle_output_axes()
        #: the constant inputs' values the model was judged with: the defaults a request may leave out
        self.constants = {name: array.tolist() for name, array in self.validation.inputs.items()
                          if self.validation.axis(name) is None and array.size <= 64} | dict(options.constants)
        # scikit-learn graphs are dynamic by construction; the others may carry a batch baked in.
        if source.kind in ("torch-export", "torchscript", "torch-factory", "onnx") and source.onnx_path is not None:
            progress("settling the batch dimension")
            self._settle_batch()
        _check_output_kinds(options.output_kinds, [spec.name for spec in source.outputs])
        progress("running the original model on the validation data")
        self.reference = self._run_reference(self.validation)
        self.output_names = [spec.name for spec in source.outputs]
        self.bases: dict[int | None, Path] = {}
        self.candidates: dict[tuple, object] = {}
        self.evaluations: dict[tuple, tuple] = {}
        self.comparisons: dict[tuple, gate_module.LatencyRatio] = {}

    # -- where samples lie -------------------------------------------------------------------------

    def _settle_input_axes(self) -> None:
        """Each input's sample axis: what ``--batch-axis`` says, else what the graph tells."""
        source, given = self.source, self.options.batch_axes
        names = [spec.name for spec in source.inputs]
        for option, named in (("--batch-axis", given), ("--constant", self.options.constants)):
            unknown = [name for name in named if name not in names]
            if unknown:
                raise UsageError(f"{option} names {unknown[0]!r}, which is not an input of the model; its inputs are "
                                 f"{', '.join(names)}")
        detected = layout_module.detect_input_axes(source.onnx_path) if source.onnx_path is not None else {}
        axes = {}
        for spec in source.inputs:
            axis = given[spec.name] if spec.name in given else detected.get(spec.name, spec.sample_axis)
            if spec.name in self.options.constants and spec.name not in given:
                axis = None  # a value given for it: the same for every sample
            if axis is not None and axis >= len(spec.shape):
                raise UsageError(f"--batch-axis {spec.name}={axis}: {spec.describe()} has rank {len(spec.shape)}; "
                                 f"give an axis below {len(spec.shape)} or 'none'")
            axes[spec.name] = axis
        if not any(axis is not None for axis in axes.values()) and source.inputs and any(spec.shape for spec in source.inputs):
            raise UsageError("no input of the model holds samples (every input is a constant); give --batch-axis NAME=AXIS")
        self.axes.update(axes)
        self._apply_axes()
        moved = {name: axis for name, axis in axes.items() if axis != 0}
        if moved:
            self.notes.append("samples per input: " + ", ".join(
                f"{name} {'constant' if axis is None else f'axis {axis}'}" for name, axis in moved.items())
                + (" (as given)" if set(moved) <= set(given) else " (from the graph)"))

    def _apply_axes(self) -> None:
        source = self.source
        source.inputs = [spec.with_axis(self.axes.get(spec.name, spec.batch_axis)) for spec in source.inputs]
        source.outputs = [spec.with_axis(self.axes.get(spec.name, spec.batch_axis)) for spec in source.outputs]

    def _settle_output_axes(self) -> None:
        """Each output's sample axis from the original run at one and two samples (the graph's word where
        that cannot tell), then which outputs are a state fed back on the next call."""
        source, data = self.source, self.validation
        names = [spec.name for spec in source.outputs]
        fallback = (layout_module.graph_output_axes(source.onnx_path, self.axes) if source.onnx_path is not None
                    else {name: 0 for name in names})
        one = self._call_original(data.slice(0, 1), "one sample")
        axes = dict(fallback)
        if len(data) >= 2 and not source.reference_batch:
            try:
                two = self.source.reference(data.slice(0, 2))
                axes = layout_module.output_axes_from_runs(one, two, names, fallback)
            except Exception:  # noqa: BLE001 - a model that takes one sample at a time: the graph's word
                pass
        self.axes.update({name: axes.get(name, 0) for name in names})
        self._apply_axes()
        if not self.state:
            self.state = layout_module.detect_state(source.inputs, source.outputs, data.slice(0, 1), one)
        for output, feeds in self.state.items():
            if output not in names or feeds not in [spec.name for spec in source.inputs]:
                raise UsageError(f"--state {output}={feeds}: name an output ({', '.join(names)}) and the input it feeds")
        if self.state:
            self.notes.append("stateful: " + ", ".join(f"{o} feeds {i}" for o, i in self.state.items())
                              + "; judged on the validation data as one sequence, each model carrying its own state")

    def _call_original(self, feeds: dict, what: str) -> list[np.ndarray]:
        try:
            # Through the splitter: a graph with a fixed batch gets it (padded), whatever ``feeds`` hold.
            return [np.asarray(r) for r in run_in_batches(_OriginalBackend(self.source), feeds, 1)]
        except Exception as exc:  # noqa: BLE001 - the user's model or data: one line that says what to do
            raise ConversionError(self._failure(exc, what)) from None

    def _failure(self, exc: BaseException, what: str) -> str:
        shapes = ", ".join(f"{name} {list(np.shape(array))}" for name, array in self.validation.inputs.items())
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        return (f"the original model failed on {what} of the {'validation' if self.real_data else 'random'} data "
                f"({shapes}): {message}; check --input-shape, --batch-axis NAME=AXIS and --constant NAME=VALUE")

    @property
    def run_batch(self) -> int:
        """Samples the gate runs at once: up to 64, fewer for large samples (a runtime's memory grows
        with the batch it runs, so memory must not grow with the validation set)."""
        data = self.validation
        sample = sum(array.nbytes for name, array in data.inputs.items() if data.axis(name) is not None) // max(1, len(data))
        return int(max(1, min(64, RUN_BATCH_BYTES // max(1, sample))))

    def _settle_batch(self) -> None:
        """Make the exported graph's batch dynamic when it then computes what the original computes at
        batch 1 and N; else fix it at the original's batch, and say why in the notes."""
        source = self.source
        feeds = self.validation.slice(0, CHECK_SAMPLES)
        if len(self.validation) < 2 or not all(spec.shape for spec in source.inputs if spec.sample_axis is not None):
            return
        if self.state:
            return  # a stateful graph keeps the batch it was given (its steps run one sample at a time)
        reference = self._run_reference(Dataset(feeds, None, "batch check", axes=dict(self.validation.axes)), sequence=False)
        declared = graph_batch(source.onnx_path, self.axes)
        if source.kind == "onnx" and declared is None:
            return  # the original graph itself takes any batch
        dynamic = source.onnx_path if declared is None else set_graph_batch(
            source.onnx_path, self.workdir / "source-dynamic.onnx", None, self.axes)
        try:
            backend = OnnxBackend(dynamic, threads=1, log_severity=4)  # its failure is expected and reported
            backend.set_layout(self.axes)
            why = agrees_per_sample(backend, reference, feeds)
            backend.close()
        except EdgepackError as exc:
            why = f"ONNX Runtime cannot load it ({exc.message})"
        if why is None:
            self.notes = [note for note in self.notes if not note.startswith("batch dimension fixed")]
            if declared is not None:
                self.notes.append(f"batch made dynamic: the graph declared batch {declared} but computes per sample")
            source.onnx_path = dynamic
        else:
            fixed = source.reference_batch or declared or 1
            self.notes.append(f"batch fixed at {fixed}: a dynamic batch was tried and {why}; the agent splits "
                              f"requests into batches of {fixed}")
            source.onnx_path = set_graph_batch(source.onnx_path, self.workdir / "source-fixed.onnx", fixed, self.axes)
        source.inputs, source.outputs = specs_from_onnx(source.onnx_path)
        self._apply_axes()

    def _run_reference(self, data: Dataset, sequence: bool = True) -> list[np.ndarray]:
        """The original's outputs on ``data`` (each output's samples on its own axis); a stateful model's
        over the data as one sequence, carrying its state from step to step."""
        split = run_in_batches
        # The original runs at the batch it was exported at (any batch when it has none); a last partial
        # chunk of a fixed batch is padded with copies of its last sample, whose outputs are dropped.
        original = _OriginalBackend(self.source)
        try:
            if sequence and self.state:
                return layout_module.run_sequence(lambda feeds: split(original, feeds, 1), data.steps(),
                                                  self.source.outputs, self.state)
            return split(original, data.inputs, self.source.reference_batch or self.run_batch)
        except EdgepackError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's model or data: one line that says what to do
            raise ConversionError(self._failure(exc, "the sequence" if sequence and self.state else "the batches")) from None

    # -- the fp32 base graph, per runtime opset ----------------------------------------------------

    def base_for(self, profile: Profile) -> Path:
        runtime = profile.runtime("onnxruntime")
        max_opset = runtime.max_opset if runtime else None
        if max_opset not in self.bases:
            self.bases[max_opset] = _prepare_base(self.source.onnx_path, self.workdir / f"base-{max_opset}", max_opset)
        return self.bases[max_opset]

    def backend_for(self, path: Path, threads: int, integer_io: bool = False, reference: bool = False):
        """The agent's backend for a candidate file (.onnx or .tflite), with the source's tensor names.
        ``reference``: an ONNX graph computed as its operators define it rather than by this host's
        fused kernels (see ``reference_arithmetic``)."""
        if Path(path).suffix == ".tflite":
            from agent.runtime.litert_backend import LiteRTBackend

            backend = LiteRTBackend(path, threads=threads, integer_io=integer_io, input_names=[s.name for s in self.source.inputs],
                                    output_names=[s.name for s in self.source.outputs])
        else:
            backend = OnnxBackend(path, threads=threads, optimize=not reference)
        backend.set_layout(self.axes, getattr(self, "constants", self.options.constants))
        return backend

    def run_candidate(self, backend, batch: int) -> list[np.ndarray]:
        """A candidate's outputs on the validation data, as the gate judges them: over the sequence for a
        stateful model (each step alone, its own state carried), else in batches of ``batch``."""
        if self.state:
            return layout_module.run_sequence(lambda feeds: run_in_batches(backend, feeds, 1), self.validation.steps(),
                                              backend.outputs, self.state)
        return run_in_batches(backend, self.validation.inputs, batch)

    def evaluate(self, path: Path, threads: int):
        # Keyed by content: two profiles may write different graphs under the same candidate name.
        key = (file_sha256(Path(path)), threads, repr(self.budgets), self.reference_arithmetic)
        if key not in self.evaluations:
            backend = self.backend_for(path, threads, reference=self.reference_arithmetic)
            invariant, deviation = batch_invariance(backend, self.validation.slice(0, CHECK_SAMPLES))
            # A batch-dependent candidate is served one sample at a time: gate what will be served.
            outputs = self.run_candidate(backend, self.run_batch if invariant else 1)
            result = gate_module.evaluate(
                layout_module.leading(self.reference, self.source.outputs), layout_module.leading(outputs, backend.outputs),
                self.output_names, self.budgets, labels=self.validation.labels, kinds=self.options.output_kinds,
            )
            result.batch_invariant, result.batch_deviation = invariant, deviation
            backend.close()
            one = self.validation.slice(0, 1)
            # Timed as this host runs it (fused kernels), whatever arithmetic the accuracy was judged in.
            backend = self.backend_for(path, threads)
            # A fixed-batch model answers one sample with one padded run of its batch, as on the device.
            latency = gate_module.measure_latency(lambda feeds: run_in_batches(backend, feeds), one)
            backend.close()
            self.evaluations[key] = (result, latency)
        return self.evaluations[key]

    def compare(self, path: Path, base: Path, threads: int):
        """Latency of candidate ``path`` relative to the fp32 ``base``, measured interleaved (cached)."""
        key = (file_sha256(Path(path)), file_sha256(Path(base)), threads)
        if key not in self.comparisons:
            candidate, baseline = self.backend_for(path, threads), self.backend_for(base, threads)
            one = self.validation.slice(0, 1)
            try:
                self.comparisons[key] = gate_module.compare_latency(lambda feeds: run_in_batches(candidate, feeds),
                                                                    lambda feeds: run_in_batches(baseline, feeds), one)
            finally:
                candidate.close()
                baseline.close()
        return self.comparisons[key]

    # -- one profile -------------------------------------------------------------------------------

    def run_profile(self, profile: Profile) -> ProfileResult:
        result = ProfileResult(profile.name, notes=list(self.notes))
        self.reference_arithmetic = not runs_natively(profile)
        overrides = dict(self.options.budget_overrides)
        if self.options.min_agreement is not None:
            overrides["min_agreement"] = self.options.min_agreement
        try:
            self.budgets = type(profile.budgets).model_validate({**profile.budgets.model_dump(), **overrides})
        except ValueError as exc:
            raise UsageError(f"budget override: {first_line(exc, 200)}") from None
        threads = max(1, min(profile.threads, os.cpu_count() or 1))
        try:
            if self.source.kind == "tflite":
                self._package_tflite(profile, result, threads)
                return result
            base = self.base_for(profile)
            coverage = _checked(check_coverage(base, profile), result)
            self.progress(f"{profile.name}: timing fp32")
            fp32_gate, fp32_latency = self.evaluate(base, threads)
            fp32_size = base.stat().st_size
            # Candidates of each base graph in their own folder, so names never collide across opsets.
            candidates = self.workdir / f"candidates-{base.parent.name}"
            candidates.mkdir(exist_ok=True)
            ctx = RecipeContext(candidates, base, self.calibration or self.validation, self.real_data,
                                lambda path: self.evaluate(path, threads), source=self.source)
            chosen = None
            specs = [(name, {}) for name in self.options.recipes] if self.options.recipes else [(r.name, r.options) for r in profile.recipes]
            for recipe_name, recipe_options in specs:
                if chosen is not None and not self.options.try_all:
                    result.candidates.append(CandidateReport(recipe_name, "not tried", ["an earlier recipe was shipped"]))
                    continue
                row, candidate = self._try_recipe(profile, recipe_name, recipe_options, ctx, fp32_latency, fp32_size, threads)
                result.candidates.append(row)
                if row.status == "passed" and chosen is None:
                    chosen = (row, candidate)
            if chosen is None:
                if not profile.fallback_to_fp32 or not fp32_gate.passed:
                    raise GateError(
                        f"{profile.name}: no recipe met the budget "
                        "and the profile does not allow an fp32 fallback; see the report"
                    )
                row = self._row("onnx-fp32", {}, base, fp32_gate, fp32_latency, fp32_latency, fp32_size, {})
                row.reasons = ["fallback: no recipe in the profile's list met the budget"]
                candidate = recipe_class("onnx-fp32")().run(ctx)
                result.candidates.append(row)
                chosen = (row, candidate)
            row, candidate = chosen
            row.status = "shipped"
            result.chosen = row.recipe
            self.progress(f"{profile.name}: writing the bundle ({row.recipe})")
            result.bundle = self._write_bundle(profile, row, candidate, fp32_latency, threads, coverage)
        except EdgepackError as exc:
            if isinstance(exc, UsageError):
                raise
            result.error = str(exc)
        return result

    def _try_recipe(self, profile, recipe_name, recipe_options, ctx, fp32_latency, fp32_size, threads):
        cls = recipe_class(recipe_name)
        if cls is None:
            return CandidateReport(recipe_name, "skipped", ["this recipe is not available in this release"]), None
        recipe = cls(recipe_options)
        if recipe.precision.startswith("int8") and not self.real_data:
            return CandidateReport(recipe_name, "skipped", ["needs calibration data (--calibration)"], recipe.config_dict()), None
        self.progress(f"{profile.name}: trying {recipe_name}")
        # The mixed recipe gates inside its run: a verdict in another arithmetic is another candidate.
        key = (recipe_name, repr(sorted(recipe.config_dict().items())), str(ctx.base_model), self.reference_arithmetic)
        try:
            if key not in self.candidates:
                self.candidates[key] = recipe.run(ctx)
            candidate = self.candidates[key]
        except RecipeFailed as exc:
            return CandidateReport(recipe_name, "failed", [str(exc)], recipe.config_dict()), None
        gate, latency = (candidate.gate, candidate.latency) if candidate.gate is not None else self.evaluate(candidate.path, threads)
        row = self._row(recipe_name, candidate.config, candidate.path, gate, latency, fp32_latency, fp32_size, candidate.details)
        reasons = list(gate.failures)
        if candidate.format == "tflite":
            from agent.runtime.litert_backend import model_ops

            reasons += check_tflite_coverage(model_ops(candidate.path), profile, tflite_min_runtime(candidate.path)).errors
        limit = profile.budgets.max_latency_vs_fp32 if not self.reference_arithmetic else None
        if recipe.precision != "fp32" and limit is not None and not reasons:
            # Enforced here, so measured interleaved with fp32 until the ratio is known within a few
            # percent; only a candidate slower beyond the margin is refused (the verdict must not flip
            # with the machine's load), else the profile's order decides.
            # One thread: with two, a busy machine preempts one of them and the synchronisation waits
            # change the ratio itself (measured: int8/fp32 1.09x idle, 1.03x beside a CPU hog).
            compared = self.compare(candidate.path, ctx.base_model, 1)
            row.latency_ratio = compared.ratio
            row.details["latency_ratio_ci"] = [round(compared.low, 3), round(compared.high, 3)]
            if compared.slower_than(limit):
                reasons.append(f"slower than fp32 on this host: {compared.describe()}")
            elif compared.ratio > limit:
                row.details["note"] = (f"not slower than fp32 beyond the {gate_module.LATENCY_MARGIN:.0%} margin: "
                                       f"{compared.describe()}")
        elif recipe.precision != "fp32" and row.latency_ratio is not None and row.latency_ratio > 1.0:
            row.details["note"] = (f"slower than fp32 on this host ({row.latency_ratio:.2f}x); not enforced: host "
                                   f"timing does not transfer to {profile.name}" + (
                                       "" if profile.budgets.max_latency_vs_fp32 is None else
                                       " (this host lacks the device's CPU kind or int8 dot products)"))
        row.status = "passed" if not reasons else "rejected"
        row.reasons = reasons or ["met the budget"]
        return row, candidate

    def _package_tflite(self, profile: Profile, result: ProfileResult, threads: int) -> None:
        """A .tflite MODEL: check its ops, gate it against ``--reference`` when given, bundle it unchanged."""
        from agent.runtime.litert_backend import model_ops

        path = Path(self.source.spec)
        if profile.runtime("litert") is None:
            raise ConversionError(f"{profile.name} has no LiteRT runtime, so it cannot run a .tflite model; use a profile "
                                  "that lists litert (rpi4, rpi5) or convert the original model for it")
        coverage = _checked(check_tflite_coverage(model_ops(path), profile, tflite_min_runtime(path)), result)
        self.progress(f"{profile.name}: checking {path.name}")
        gate, latency = self.evaluate(path, threads)
        size = path.stat().st_size
        row = CandidateReport(AS_GIVEN, "shipped", [], {}, size, None, latency.p50_ms, None, gate.to_dict(), {}, path)
        compared_with = self.source.compared_with
        if compared_with is None:
            skipped = "skipped: nothing to compare with (give --reference ORIGINAL to gate it)"
            row.metrics = {"gate": skipped} | ({"accuracy": gate.accuracy} if gate.accuracy is not None else {})
            row.reasons = [f"packaged as given; accuracy gate {skipped}"]
            if gate.accuracy is not None:
                row.reasons.append(f"accuracy on the validation labels {gate.accuracy:.2%}")
            result.notes.append(f"accuracy gate {skipped}")
        elif gate.failures:
            raise GateError(f"{profile.name}: {path.name} does not meet the budget against {compared_with}: " + "; ".join(gate.failures))
        else:
            row.reasons = [f"packaged as given; met the budget against {compared_with}"]
        result.candidates.append(row)
        result.chosen = AS_GIVEN
        candidate = Candidate(AS_GIVEN, path, "tflite", tflite_precision(path), {})
        self.progress(f"{profile.name}: writing the bundle ({path.name} as given)")
        result.bundle = self._write_bundle(profile, row, candidate, latency, threads, coverage)

    def _row(self, recipe_name, config, path, gate, latency, fp32_latency, fp32_size, details) -> CandidateReport:
        size = path.stat().st_size
        return CandidateReport(
            recipe_name, "passed", [], config, size, size / fp32_size if fp32_size else None, latency.p50_ms,
            latency.p50_ms / fp32_latency.p50_ms if fp32_latency.p50_ms else None, gate.to_dict(), dict(details), path,
        )

    # -- the bundle --------------------------------------------------------------------------------

    def _write_bundle(self, profile: Profile, row: CandidateReport, candidate, fp32_latency, threads, coverage) -> Path:
        writer = BundleWriter()
        tflite = candidate.format == "tflite"
        model_file = writer.add_file("model/model.tflite" if tflite else "model/model.onnx", candidate.path)
        backend = self.backend_for(candidate.path, threads, reference=self.reference_arithmetic)
        gate_result, _ = self.evaluate(candidate.path, threads)
        deviation = gate_result.batch_deviation
        batch = {"mode": "fixed" if backend.batch_size else "dynamic", "size": backend.batch_size,
                 "invariant": bool(gate_result.batch_invariant),
                 # None when alone and batched differ in shape or in integer outputs (no finite measure)
                 "max_relative_deviation": float(f"{deviation:.3g}") if math.isfinite(deviation) else None}
        if self.constants:
            batch["constants"] = dict(self.constants)
        if self.state:
            batch["state"] = dict(self.state)
        sample_inputs = self.validation.slice(0, SAMPLE_COUNT)
        # The expected outputs are computed as the agent will compute them (alone when batch-dependent).
        sample_outputs = run_in_batches(backend, sample_inputs, 64 if batch["invariant"] else 1)
        samples = {"count": min(SAMPLE_COUNT, len(self.validation)), "inputs": {}, "outputs": {}, "tolerance": {}}
        for index, (spec, array) in enumerate(zip(backend.inputs, sample_inputs.values())):
            samples["inputs"][spec.name] = writer.add_array(f"samples/input_{index}.npy", array)
        for index, (spec, array) in enumerate(zip(backend.outputs, sample_outputs)):
            samples["outputs"][spec.name] = writer.add_array(f"samples/output_{index}.npy", _storable(array))
            samples["tolerance"][spec.name] = _tolerance(array)
        stats_data = self.calibration or self.validation
        # Statistics and drift see samples on axis 0, as the agent hands them over (constants left out).
        reference_outputs = dict(zip(self.output_names, layout_module.leading(self.reference, self.source.outputs)))
        # Drift is judged against the validation data (held out from calibration, like live traffic).
        kinds = {name: gate_module.output_kind(array, (self.options.output_kinds or {}).get(name))
                 for name, array in reference_outputs.items()}
        writer.add_bytes("stats/reference.json", _json_bytes(dataset_stats(
            _leading_inputs(stats_data), stats_data.source, reference_outputs,
            _leading_inputs(self.validation) if self.real_data else None, kinds)))
        runtime = profile.runtime("litert" if tflite else "onnxruntime")
        file_io = self.backend_for(candidate.path, threads, integer_io=True) if tflite else backend
        import onnxruntime

        tools = {"edgepack": __version__, "numpy": np.__version__, **self.source.tools}
        if tflite:
            tools |= package_versions("litert-torch", "ai-edge-litert")
        else:
            tools["onnxruntime"] = onnxruntime.__version__

        manifest = {
            "name": self.name,
            "version": self.options.version,
            "profile": profile.name,
            "created": _created(),
            "runtime": {"name": runtime.name, "min_version": runtime.min_version,
                        "execution_providers": runtime.execution_providers, "delegates": runtime.delegates,
                        "threads": profile.threads},
            "format": candidate.format,
            "precision": candidate.precision,
            # The CPU the gate's verdict assumed: an int8 ONNX graph judged for a profile with int8 dot
            # products computes something else on x86 without VNNI (the agent says so if its check fails).
            "cpu": {"arch": profile.arch, "int8_dot_product": profile.cpu.int8_dot_product},
            "model_file": model_file,
            # The model file's own I/O types (int8 + scale/zero point for full-integer TFLite models).
            "inputs": [spec.to_dict() for spec in file_io.inputs],
            "outputs": [spec.to_dict() for spec in file_io.outputs],
            "preprocessing": self.validation.preprocessing or None,
            "recipe": {"name": row.recipe, "config": row.config, "details": row.details, "reason": row.reasons},
            "metrics": {**(row.metrics or {}), "validation": {"source": Path(self.validation.source).name if self.real_data else "random",
                                                              "samples": len(self.validation), "labels": self.validation.labels is not None}},
            "host_latency": {"p50_ms": row.p50_ms, "fp32_p50_ms": fp32_latency.p50_ms, "ratio_vs_fp32": row.latency_ratio,
                             # the ratio that decided, where measured interleaved (one thread, with its interval)
                             "ratio_interval": row.details.get("latency_ratio_ci"),
                             "threads": threads, "machine": platform.machine(), "batch": 1},
            "size": {"bytes": row.size_bytes, "ratio_vs_fp32": row.size_ratio},
            "samples": samples,
            # How the agent may split and merge work: the model file's batch, and whether a sample's
            # output is independent of the rest of its batch (else requests are never merged).
            "batch": batch,
            "reference_stats": "stats/reference.json",
            # What the agent's drift alarms are set to (agent.drift; drift_false_alarm_rate overrides it)
            "drift": {"false_alarm_rate": FALSE_ALARM_RATE, "reference": "validation",
                      "samples": len(self.validation)} if self.real_data else None,
            "coverage": {"opset": coverage.opset, "warnings": coverage.warnings} if not tflite else
                        {"ops": sorted(backend.op_names()), "min_runtime_version": tflite_min_runtime(candidate.path),
                         "warnings": []},
            "source": {"kind": self.source.kind, "name": Path(self.source.spec).name, "sha256": self.source.sha256},
            "tools": tools,
            "notes": self.notes,
        }
        backend.close()
        target = self.options.out / bundle_filename(self.name, self.options.version, profile.name)
        writer.write(target, manifest)
        if self.options.signing_key:
            from edgepack.bundle.sign import sign_bundle

            sign_bundle(target, self.options.signing_key)
        return target


class _OriginalBackend(Backend):
    """The original model behind the agent's batch splitter (its batch, its tensors' axes)."""

    def __init__(self, source: SourceModel):
        self.source, self.inputs, self.outputs = source, source.inputs, source.outputs

    @property
    def batch_size(self) -> int | None:
        return self.source.reference_batch

    def run(self, feeds):
        return [np.asarray(output) for output in self.source.reference(feeds)]


def _leading_inputs(data: Dataset) -> dict[str, np.ndarray]:
    moved = {}
    for name, array in data.inputs.items():
        axis = data.axis(name)
        if axis is not None:
            moved[name] = np.moveaxis(array, axis, 0) if axis else array
    return moved


def _checked(coverage, result: ProfileResult):
    """Record the op coverage in the result; refuse the profile when the device cannot run an op."""
    result.coverage = coverage.to_dict()
    if coverage.errors:
        raise ConversionError(f"{result.profile}: unsupported ops: " + "; ".join(coverage.errors))
    return coverage


def tflite_precision(path: Path) -> str:
    """What a .tflite file computes in: int8 (integer I/O or int8 activations), int8-dynamic (int8
    weights only), fp16 (fp16 weights), else fp32."""
    from agent.runtime.litert_backend import interpreter_class

    interpreter = interpreter_class()(model_path=str(path))
    details = interpreter.get_tensor_details()
    inputs = {d["index"] for d in interpreter.get_input_details()}
    dtypes = [np.dtype(d["dtype"]) for d in details]
    quantized = [d for d in details if np.dtype(d["dtype"]).kind in "iu"
                 and (d["quantization"][0] or len(d.get("quantization_parameters", {}).get("scales", ())))]
    if any(d["index"] in inputs for d in quantized) or len(quantized) > len(details) // 2:
        return "int8"
    if quantized:
        return "int8-dynamic"
    if np.dtype(np.float16) in dtypes:
        return "fp16"
    return "fp32"


def _check_output_kinds(kinds: dict, names: list[str]) -> None:
    for name, kind in kinds.items():
        if name not in names:
            raise UsageError(f"--output-kind names output {name!r}; the model's outputs are {', '.join(names)}")
        if kind not in gate_module.OUTPUT_KINDS:
            raise UsageError(f"--output-kind {name}={kind}: use one of {', '.join(gate_module.OUTPUT_KINDS)}")


def _prepare_base(source: Path, folder: Path, max_opset: int | None) -> Path:
    """The fp32 graph every recipe starts from: opset converted down if needed, then pre-processed."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(source))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    converted = folder / "converted.onnx"
    if max_opset and opset > max_opset:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, max_opset)
            onnx.checker.check_model(model)
        except Exception as exc:
            raise ConversionError(
                f"the graph uses opset {opset} and cannot be converted down to opset {max_opset} for this profile's "
                f"runtime ({first_line(exc, 160)})"
            ) from None
    onnx.save(model, str(converted))
    target = folder / "fp32.onnx"
    # Shape inference and ORT's portable graph optimizations: what quantization expects as input. Its
    # symbolic shape inference writes a temporary file into the *current* folder when it gives up, so
    # it runs in a child process whose working folder is the work folder (never os.chdir here: that
    # is process-wide).
    code = ("import sys\nfrom onnxruntime.quantization.shape_inference import quant_pre_process\n"
            "quant_pre_process(sys.argv[1], sys.argv[2], skip_symbolic_shape=False)")
    done = subprocess.run([sys.executable, "-c", code, str(converted.resolve()), str(target.resolve())], cwd=folder,
                          capture_output=True, text=True)
    if done.returncode != 0 or not target.is_file():
        error = (done.stderr.strip().splitlines() or ["unknown error"])[-1][:200]
        log.info("pre-processing skipped (%s); using the exported graph as is", error)
        shutil.copyfile(converted, target)
    return target


def _storable(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array.astype(str) if array.dtype.kind == "O" else array


def _tolerance(array: np.ndarray) -> dict:
    """How close a device's output must be to the expected sample output (the smoke test).

    Another CPU, runtime build or kernel choice rounds int8 and float differently, so the bound is
    relative to the output's range rather than bit-exact.
    """
    array = np.asarray(array)
    if array.dtype.kind != "f" or array.size == 0:
        return {"exact": True}
    spread = float(np.nanmax(array) - np.nanmin(array)) if np.isfinite(array).any() else 0.0
    return {"atol": max(1e-4, 0.05 * spread), "rtol": 1e-3}


def _json_bytes(data) -> bytes:
    import json

    return json.dumps(data, sort_keys=True, indent=1).encode()


def _created() -> str:
    """Creation time; SOURCE_DATE_EPOCH (the reproducible-builds convention) makes it fixed."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch else datetime.datetime.now(datetime.timezone.utc)
    return moment.replace(microsecond=0).isoformat()
