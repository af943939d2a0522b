"""``edgepack convert``: export once, then per profile try its recipes in order through the gate.

The first recipe (in the profile's order, or ``--recipe`` order) that meets the accuracy budget and
is not slower than fp32 where the profile enforces it is shipped; every candidate tried is reported
with its size, latency and metrics, and why it won or lost.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

from edgepack.bundle.format import is_valid_name, is_valid_semver
from edgepack.errors import ConversionError, EdgepackError, GateError, InputFileError, UsageError, first_line
from edgepack.profiles import Profile, get_profile
from edgepack.recipes import recipe_info

from . import gate as gate_module
from .coverage import check_coverage, check_tflite_coverage, tflite_min_runtime
from .data import load_dataset, random_dataset
from .evaluation import Evaluation, runs_natively
from .packaging import Packaging, tflite_precision
from .recipes import recipe_class
from .recipes.base import Candidate, RecipeContext, RecipeFailed
from .results import CandidateReport, ConvertOptions, ProfileResult
from .sources import SourceModel, detect_kind, load_source

__all__ = ["CandidateReport", "ConvertOptions", "ProfileResult", "convert", "runs_natively", "tflite_precision"]

log = logging.getLogger(__name__)
#: the "recipe" of a .tflite MODEL packaged without re-conversion
AS_GIVEN = "tflite-as-given"


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


class _Job(Evaluation, Packaging):
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
        # (``--constant`` values are in the data already, shaped as the input takes them.)
        self.constants = {name: array.tolist() for name, array in self.validation.inputs.items()
                          if self.validation.axis(name) is None and array.size <= 64}
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
            # A recipe named with --recipe keeps the options the profile gives it (x86-64's 7-bit weights).
            listed = {r.name: r.options for r in profile.recipes}
            specs = ([(name, listed.get(name, {})) for name in self.options.recipes] if self.options.recipes
                     else [(r.name, r.options) for r in profile.recipes])
            for recipe_name, recipe_options in specs:
                # --try-all reports every recipe but ships what a plain run would.
                open_choice = chosen is None or self._look_further(chosen[0], recipe_name)
                if not open_choice and not self.options.try_all:
                    result.candidates.append(CandidateReport(recipe_name, "not tried", ["an earlier recipe was shipped"]))
                    continue
                row, candidate = self._try_recipe(profile, recipe_name, recipe_options, ctx, fp32_latency, fp32_size, threads)
                result.candidates.append(row)
                if row.status == "passed" and open_choice and (chosen is None or self._clearly_faster(row, chosen[0])):
                    if chosen is not None:
                        row.details["shipped_over"] = (f"{chosen[0].recipe} (passed at {chosen[0].latency_ratio:.2f}x "
                                                       f"fp32; this one {row.latency_ratio:.2f}x)")
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

    def _look_further(self, chosen: CandidateReport, recipe_name: str) -> bool:
        """Whether a later recipe is still worth trying after ``chosen`` passed: only where this host times the
        device, only after a mixed candidate (it keeps layers float: a compromise, where a full-int8 pass is
        final), only for int8 recipes (fp32 is the fallback), and only while ``chosen`` is slower than the
        profile's ``ship_at_latency_vs_fp32`` (MiniLM's mixed int8 at 0.79x fp32, dynamic int8 after it at 0.45x)."""
        target = self.budgets.ship_at_latency_vs_fp32
        if target is None or self.reference_arithmetic or chosen.latency_ratio is None:
            return False
        if recipe_class(chosen.recipe) is None or recipe_class(chosen.recipe).precision != "int8-mixed":
            return False
        cls = recipe_class(recipe_name)
        return cls is not None and cls.precision.startswith("int8") and chosen.latency_ratio > target

    @staticmethod
    def _clearly_faster(row: CandidateReport, chosen: CandidateReport) -> bool:
        """Faster beyond the latency margin even at the ends of both intervals, so noise (a busy host) never
        overturns the profile's order."""
        if row.latency_ratio is None or chosen.latency_ratio is None:
            return False
        high = row.details.get("latency_ratio_ci", [row.latency_ratio] * 2)[1]
        low = chosen.details.get("latency_ratio_ci", [chosen.latency_ratio] * 2)[0]
        return high < low * (1 - gate_module.LATENCY_MARGIN)

    def _try_recipe(self, profile, recipe_name, recipe_options, ctx, fp32_latency, fp32_size, threads):
        cls = recipe_class(recipe_name)
        if cls is None:
            return CandidateReport(recipe_name, "skipped", ["this recipe is not available in this release"]), None
        recipe = cls(recipe_options)
        if recipe.precision.startswith("int8") and not self.real_data:
            # Dynamic int8 calibrates nothing, but random inputs prove nothing about its accuracy either.
            info = recipe_info(recipe_name)
            why = ("needs calibration data (--calibration)" if info is None or info.needs_calibration else
                   "needs real data to judge its accuracy (--validation or --calibration)")
            return CandidateReport(recipe_name, "skipped", [why], recipe.config_dict()), None
        self.progress(f"{profile.name}: trying {recipe_name}")
        # The mixed recipe gates inside its run: a verdict in another arithmetic is another candidate.
        # A search's outcome depends on the budgets and threads it was judged with (profiles differ).
        searched = (repr(self.budgets), threads) if recipe.precision == "int8-mixed" else None
        key = (recipe_name, repr(sorted(recipe.config_dict().items())), str(ctx.base_model), self.reference_arithmetic,
               searched)
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
            from .evaluation import model_ops

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
        from .evaluation import model_ops

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


def _checked(coverage, result: ProfileResult):
    """Record the op coverage in the result; refuse the profile when the device cannot run an op."""
    result.coverage = coverage.to_dict()
    if coverage.errors:
        raise ConversionError(f"{result.profile}: unsupported ops: " + "; ".join(coverage.errors))
    return coverage


def _check_output_kinds(kinds: dict, names: list[str]) -> None:
    for name, kind in kinds.items():
        if name not in names:
            raise UsageError(f"--output-kind names output {name!r}; the model's outputs are {', '.join(names)}")
        if kind not in gate_module.OUTPUT_KINDS:
            raise UsageError(f"--output-kind {name}={kind}: use one of {', '.join(gate_module.OUTPUT_KINDS)}")
