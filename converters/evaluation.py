"""The evaluation half of a conversion: where each tensor holds its samples, the original's runs (one
sequence for a stateful model), the batch settling, candidate backends, the accuracy gate and the
latency comparison. The only converter module besides packaging that loads models with
``agent.runtime`` (the agent's own backends and batch splitter, so a candidate is judged as served).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from agent.runtime import Backend, run_in_batches
from agent.runtime.cpu import host_arch, host_int8_dot_product
from agent.runtime.onnx_backend import OnnxBackend
# The rest of converters reaches agent through this module only (DESIGN.md section 2): re-exported.
from agent.drift.reference import FALSE_ALARM_RATE, drift_reference  # noqa: F401
from agent.runtime.litert_backend import LiteRTBackend, interpreter_class, model_ops  # noqa: F401
from edgepack.errors import ConversionError, EdgepackError, UsageError, first_line
from edgepack.profiles import Profile

from . import gate as gate_module
from . import layout as layout_module
from .batching import CHECK_SAMPLES, agrees_per_sample, batch_invariance, graph_batch, set_graph_batch
from .data import Dataset
from .onnx.simplify import opset_of, simplify
from .sources import SourceModel, file_sha256, specs_from_onnx

log = logging.getLogger(__name__)
#: input bytes the gate's runs hold at once (a batch of 64 small samples; one 640x640 image)
RUN_BATCH_BYTES = 4 << 20


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


class Evaluation:
    """The conversion job's evaluation methods (mixed into ``pipeline._Job``, which holds the state:
    ``options``, ``source``, ``validation``, ``axes``, ``state``, ``reference``, the caches)."""

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
            self.bases[max_opset] = prepare_base(self.source.onnx_path, self.workdir / f"base-{max_opset}", max_opset)
        return self.bases[max_opset]

    def backend_for(self, path: Path, threads: int, integer_io: bool = False, reference: bool = False,
                    timing: bool = False):
        """The agent's backend for a candidate file (.onnx or .tflite), with the source's tensor names.
        ``reference``: an ONNX graph computed as its operators define it rather than by this host's
        fused kernels (see ``reference_arithmetic``). ``timing``: a session to time, as the agent runs it:
        ONNX Runtime's threads not spinning (the agent's default). Spinning threads also make two
        sessions timed in turn slow each other down (the idle one's threads spin on the cores the
        other needs): the PP-OCR detector's fp32 graph took 85 ms that way against 50 ms alone."""
        if Path(path).suffix == ".tflite":
            from agent.runtime.litert_backend import LiteRTBackend

            backend = LiteRTBackend(path, threads=threads, integer_io=integer_io, input_names=[s.name for s in self.source.inputs],
                                    output_names=[s.name for s in self.source.outputs])
        else:
            backend = OnnxBackend(path, threads=threads, optimize=not reference, spinning=False if timing else None)
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
            backend = self.backend_for(path, threads, timing=True)
            # A fixed-batch model answers one sample with one padded run of its batch, as on the device.
            latency = gate_module.measure_latency(lambda feeds: run_in_batches(backend, feeds), one)
            backend.close()
            self.evaluations[key] = (result, latency)
        return self.evaluations[key]

    def compare(self, path: Path, base: Path, threads: int):
        """Latency of candidate ``path`` relative to the fp32 ``base``, measured interleaved (cached)."""
        key = (file_sha256(Path(path)), file_sha256(Path(base)), threads)
        if key not in self.comparisons:
            candidate, baseline = self.backend_for(path, threads, timing=True), self.backend_for(base, threads, timing=True)
            one = self.validation.slice(0, 1)
            try:
                self.comparisons[key] = gate_module.compare_latency(lambda feeds: run_in_batches(candidate, feeds),
                                                                    lambda feeds: run_in_batches(baseline, feeds), one)
            finally:
                candidate.close()
                baseline.close()
        return self.comparisons[key]


class _OriginalBackend(Backend):
    """The original model behind the agent's batch splitter (its batch, its tensors' axes)."""

    def __init__(self, source: SourceModel):
        self.source, self.inputs, self.outputs = source, source.inputs, source.outputs

    @property
    def batch_size(self) -> int | None:
        return self.source.reference_batch

    def run(self, feeds):
        return [np.asarray(output) for output in self.source.reference(feeds)]


def prepare_base(source: Path, folder: Path, max_opset: int | None) -> Path:
    """The fp32 graph every recipe starts from: opset converted (down when the runtime needs it, up to
    ``QUANTIZATION_OPSET`` when it allows), pre-processed, then simplified (``converters.onnx.simplify``)."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(source))
    opset = opset_of(model)
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
    elif opset and opset < QUANTIZATION_OPSET and (max_opset is None or max_opset > opset):
        model = _upgraded(model, min(QUANTIZATION_OPSET, max_opset or QUANTIZATION_OPSET))
    onnx.save(model, str(converted))
    target = folder / "fp32.onnx"
    # Shape inference and ORT's portable graph optimizations: what quantization expects as input. Its
    # symbolic shape inference writes a temporary file into the *current* folder when it gives up, so
    # it runs in a child process whose working folder is the work folder (never os.chdir here: that
    # is process-wide). A graph it cannot infer symbolically (PP-OCR's detector: "Incomplete symbolic
    # shape inference") still gets ONNX's shape inference and the optimizations (Conv+BN folding).
    errors = []
    for symbolic in (True, False):
        code = ("import sys\nfrom onnxruntime.quantization.shape_inference import quant_pre_process\n"
                f"quant_pre_process(sys.argv[1], sys.argv[2], skip_symbolic_shape={not symbolic})")
        done = subprocess.run([sys.executable, "-c", code, str(converted.resolve()), str(target.resolve())], cwd=folder,
                              capture_output=True, text=True)
        if done.returncode == 0 and target.is_file():
            break
        errors.append((done.stderr.strip().splitlines() or ["unknown error"])[-1][:200])
    else:
        log.info("pre-processing skipped (%s); using the exported graph as is", "; ".join(errors))
        shutil.copyfile(converted, target)
    model = onnx.load(str(target))
    _name_nodes(model)
    try:
        counts = simplify(model)
        if any(counts.values()):
            model = onnx.shape_inference.infer_shapes(model)
            onnx.checker.check_model(model)
            log.info("graph simplified: %s", counts)
    except Exception as exc:  # noqa: BLE001 - a rewrite the checker refuses is not used
        log.info("graph simplification skipped (%s)", first_line(exc, 200))
        model = onnx.load(str(target))
        _name_nodes(model)
    onnx.save(model, str(target))
    return target


def _name_nodes(model) -> None:
    """Name every unnamed node deterministically: the quantizer excludes nodes by name (the mixed
    recipe's float layers), and exporters and ORT's pre-processing may leave names empty."""
    taken = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


#: per-channel QDQ needs DequantizeLinear's axis (opset 13); HardSwish is an operator from opset 14
QUANTIZATION_OPSET = 14


def _upgraded(model, opset: int):
    """``model`` converted up to ``opset``, or unchanged when ONNX's version converter cannot."""
    import onnx
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, opset)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # noqa: BLE001 - older opsets still convert; only per-channel int8 and fusions need it
        log.info("opset %d kept (%s)", opset_of(model), first_line(exc, 160))
        return model
    return upgraded
