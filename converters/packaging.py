"""Writing one bundle: the model file, smoke-test samples with tolerances, reference statistics for
drift, and the manifest (``edgepack.bundle/v1``, checked against its schema by the writer)."""

from __future__ import annotations

import datetime
import math
import os
import platform
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from edgepack import __version__
from edgepack.bundle import SCHEMA, BundleWriter, bundle_filename
from edgepack.bundle.manifest import Batch, Manifest, RuntimeEntry, Samples, TensorEntry, Tolerance, manifest_error
from edgepack.profiles import Profile

from . import gate as gate_module
from . import layout as layout_module
from .coverage import tflite_min_runtime
from .data import Dataset
from .evaluation import FALSE_ALARM_RATE, interpreter_class, run_in_batches
from .results import CandidateReport
from .sources import package_versions
from .stats import dataset_stats

#: smoke-test samples written into the bundle
SAMPLE_COUNT = 4


class Packaging:
    """The conversion job's bundle writing (mixed into ``pipeline._Job``)."""

    # -- the bundle --------------------------------------------------------------------------------

    def _write_bundle(self, profile: Profile, row: CandidateReport, candidate, fp32_latency, threads, coverage) -> Path:
        writer = BundleWriter()
        try:
            manifest = self._manifest(writer, profile, row, candidate, fp32_latency, threads, coverage)
        except ValidationError as exc:  # a builder bug: refused here as the writer would refuse it
            raise manifest_error(exc) from None
        target = self.options.out / bundle_filename(self.name, self.options.version, profile.name)
        writer.write(target, manifest.to_dict())
        if self.options.signing_key:
            from edgepack.bundle.sign import sign_bundle

            sign_bundle(target, self.options.signing_key)
        return target

    def _manifest(self, writer: BundleWriter, profile: Profile, row: CandidateReport, candidate, fp32_latency, threads,
                  coverage) -> Manifest:
        """Add the model, samples and statistics to ``writer``; return the manifest that describes them."""
        tflite = candidate.format == "tflite"
        model_file = writer.add_file("model/model.tflite" if tflite else "model/model.onnx", candidate.path)
        backend = self.backend_for(candidate.path, threads, reference=self.reference_arithmetic)
        gate_result, _ = self.evaluate(candidate.path, threads)
        deviation = gate_result.batch_deviation
        # constants and state are left unset (absent from the manifest) when there are none
        batch = Batch(mode="fixed" if backend.batch_size else "dynamic", size=backend.batch_size,
                      invariant=bool(gate_result.batch_invariant),
                      # None when alone and batched differ in shape or in integer outputs (no finite measure)
                      max_relative_deviation=float(f"{deviation:.3g}") if math.isfinite(deviation) else None,
                      **({"constants": dict(self.constants)} if self.constants else {}),
                      **({"state": dict(self.state)} if self.state else {}))
        sample_inputs = self.validation.slice(0, SAMPLE_COUNT)
        # The expected outputs are computed as the agent will compute them (alone when batch-dependent).
        sample_outputs = run_in_batches(backend, sample_inputs, 64 if batch.invariant else 1)
        sample_files: dict[str, dict[str, str]] = {"inputs": {}, "outputs": {}}
        tolerance: dict[str, Tolerance] = {}
        for index, (spec, array) in enumerate(zip(backend.inputs, sample_inputs.values())):
            sample_files["inputs"][spec.name] = writer.add_array(f"samples/input_{index}.npy", array)
        for index, (spec, array) in enumerate(zip(backend.outputs, sample_outputs)):
            sample_files["outputs"][spec.name] = writer.add_array(f"samples/output_{index}.npy", _storable(array))
            tolerance[spec.name] = _tolerance(array)
        samples = Samples(count=min(SAMPLE_COUNT, len(self.validation)), **sample_files, tolerance=tolerance)
        stats_data = self.calibration or self.validation
        # Statistics and drift see samples on axis 0, as the agent hands them over (constants left out).
        reference_outputs = dict(zip(self.output_names, layout_module.leading(self.reference, self.source.outputs)))
        # Drift is judged against the validation data (held out from calibration, like live traffic).
        kinds = {name: gate_module.output_kind(array, (self.options.output_kinds or {}).get(name))
                 for name, array in reference_outputs.items()}
        writer.add_bytes("stats/reference.json", _json_bytes(dataset_stats(
            # the file's name, not where it lay on the host: the same data gives the same bundle anywhere
            _leading_inputs(stats_data), Path(stats_data.source).name if stats_data.source else "random", reference_outputs,
            _leading_inputs(self.validation) if self.real_data else None, kinds)))
        runtime = profile.runtime("litert" if tflite else "onnxruntime")
        file_io = self.backend_for(candidate.path, threads, integer_io=True) if tflite else backend
        import onnxruntime

        tools = {"edgepack": __version__, "numpy": np.__version__, **self.source.tools}
        if tflite:
            tools |= package_versions("litert-torch", "ai-edge-litert")
        else:
            tools["onnxruntime"] = onnxruntime.__version__

        manifest = Manifest(
            schema=SCHEMA,
            name=self.name,
            version=self.options.version,
            profile=profile.name,
            created=_created(),
            runtime=RuntimeEntry(name=runtime.name, min_version=runtime.min_version,
                                 execution_providers=runtime.execution_providers, delegates=runtime.delegates,
                                 threads=profile.threads),
            format=candidate.format,
            precision=candidate.precision,
            # The CPU the gate's verdict assumed: an int8 ONNX graph judged for a profile with int8 dot
            # products computes something else on x86 without VNNI (the agent says so if its check fails).
            cpu={"arch": profile.arch, "int8_dot_product": profile.cpu.int8_dot_product},
            model_file=model_file,
            files=writer.file_entries(),
            # The model file's own I/O types (int8 + scale/zero point for full-integer TFLite models).
            inputs=[TensorEntry.model_validate(spec.to_dict()) for spec in file_io.inputs],
            outputs=[TensorEntry.model_validate(spec.to_dict()) for spec in file_io.outputs],
            preprocessing=self.validation.preprocessing or None,
            recipe={"name": row.recipe, "config": row.config, "details": row.details, "reason": row.reasons},
            metrics={**(row.metrics or {}), "validation": {"source": Path(self.validation.source).name if self.real_data else "random",
                                                           "samples": len(self.validation), "labels": self.validation.labels is not None}},
            host_latency={"p50_ms": row.p50_ms, "fp32_p50_ms": fp32_latency.p50_ms, "ratio_vs_fp32": row.latency_ratio,
                          # the ratio that decided, where measured interleaved (one thread, with its interval)
                          "ratio_interval": row.details.get("latency_ratio_ci"),
                          "threads": threads, "machine": platform.machine(), "batch": 1},
            size={"bytes": row.size_bytes, "ratio_vs_fp32": row.size_ratio},
            samples=samples,
            # How the agent may split and merge work: the model file's batch, and whether a sample's
            # output is independent of the rest of its batch (else requests are never merged).
            batch=batch,
            reference_stats="stats/reference.json",
            # What the agent's drift alarms are set to (agent.drift; drift_false_alarm_rate overrides it)
            drift={"false_alarm_rate": FALSE_ALARM_RATE, "reference": "validation",
                   "samples": len(self.validation)} if self.real_data else None,
            coverage={"opset": coverage.opset, "warnings": coverage.warnings} if not tflite else
                     {"ops": sorted(backend.op_names()), "min_runtime_version": tflite_min_runtime(candidate.path),
                      "warnings": []},
            source={"kind": self.source.kind, "name": Path(self.source.spec).name, "sha256": self.source.sha256},
            tools=tools,
            notes=self.notes,
        )
        backend.close()
        return manifest


def _leading_inputs(data: Dataset) -> dict[str, np.ndarray]:
    moved = {}
    for name, array in data.inputs.items():
        axis = data.axis(name)
        if axis is not None:
            moved[name] = np.moveaxis(array, axis, 0) if axis else array
    return moved


def tflite_precision(path: Path) -> str:
    """What a .tflite file computes in: int8 (integer I/O or int8 activations), int8-dynamic (int8
    weights only), fp16 (fp16 weights), else fp32."""
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


def _storable(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array.astype(str) if array.dtype.kind == "O" else array


def _tolerance(array: np.ndarray) -> Tolerance:
    """How close a device's output must be to the expected sample output (the smoke test).

    Another CPU, runtime build or kernel choice rounds int8 and float differently, so the bound is
    relative to the output's range rather than bit-exact.
    """
    array = np.asarray(array)
    if array.dtype.kind != "f" or array.size == 0:
        return Tolerance(exact=True)
    spread = float(np.nanmax(array) - np.nanmin(array)) if np.isfinite(array).any() else 0.0
    return Tolerance(atol=max(1e-4, 0.05 * spread), rtol=1e-3)


def _json_bytes(data) -> bytes:
    import json

    return json.dumps(data, sort_keys=True, indent=1).encode()


def _created() -> str:
    """Creation time; SOURCE_DATE_EPOCH (the reproducible-builds convention) makes it fixed."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch else datetime.datetime.now(datetime.timezone.utc)
    return moment.replace(microsecond=0).isoformat()
