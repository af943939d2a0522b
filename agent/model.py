"""A bundle loaded for serving: its verified manifest, its backend, its batch rules and its smoke test."""

from __future__ import annotations

import logging

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepack.bundle import Bundle
from edgepack.errors import StoreError
from edgepack.tensors import TensorSpec

from .runtime import Backend, load_backend, run_in_batches
from .runtime.base import served_spec


@dataclass
class LoadedModel:
    """A model ready to answer requests.

    ``inputs``/``outputs`` are what callers see: any number of samples on the batch axis, also for a
    model exported with a fixed batch (the one splitter runs it in chunks of that batch).
    """

    name: str
    version: str
    manifest: dict
    backend: Backend
    folder: Path
    #: seconds one sample takes on this machine, measured at load (None until measured)
    sample_seconds: float | None = None
    #: what is derived from the backend's specs, kept while they stay the same lists (every request reads it)
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _derived_from: tuple = field(default=(None, None), init=False, repr=False, compare=False)

    def _cached(self, key, make):
        # A backend that changes its specs (layout, integer I/O) assigns new lists: compared by identity,
        # held here so an identity is never reused.
        specs = self.backend.inputs, self.backend.outputs
        if specs[0] is not self._derived_from[0] or specs[1] is not self._derived_from[1]:
            self._derived, self._derived_from = {}, specs
        derived = self._derived
        if key not in derived:
            derived[key] = make()
        return derived[key]

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._cached("inputs", lambda: [served_spec(s) for s in self.backend.inputs]
                            if self.backend.batched else self.backend.inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._cached("outputs", lambda: [served_spec(s) for s in self.backend.outputs]
                            if self.backend.batched else self.backend.outputs)

    @property
    def mergeable(self) -> bool:
        """Whether requests may be concatenated into one run: samples on axis 0 of every tensor and no
        constant input (two requests may send different constants)."""
        return self.backend.plain and self.backend.batched

    def leading(self, feeds: dict, outputs: dict | None) -> tuple[dict, dict | None]:
        """``feeds`` and ``outputs`` with samples on axis 0 and no constants (views), as drift and the
        converter's reference statistics see them."""
        if self.backend.plain:
            return feeds, outputs
        return to_leading(feeds, self.backend.inputs), to_leading(outputs, self.backend.outputs)

    @property
    def state(self) -> dict[str, str]:
        """Outputs that feed an input on the next call (output name -> input name): a stateful model."""
        return dict((self.manifest.get("batch") or {}).get("state") or {})

    @property
    def batch_size(self) -> int | None:
        """The model file's fixed batch, or None when it takes any batch size."""
        return self.backend.batch_size

    @property
    def batch_invariant(self) -> bool:
        """Whether a sample's outputs do not depend on the other samples of its batch (recorded by the
        converter's gate; bundles made before it was recorded are taken as invariant)."""
        return bool((self.manifest.get("batch") or {}).get("invariant", True))

    def merge_limit(self, configured: int) -> int:
        """How many samples one run may hold: 1 when the outputs depend on the batch, at most the fixed
        batch of a fixed-batch model, else ``configured``."""
        return self._cached(("merge_limit", configured), lambda: self._merge_limit(configured))

    def _merge_limit(self, configured: int) -> int:
        if not self.backend.batched or not self.batch_invariant:
            return 1
        if not self.mergeable:
            return configured  # one request's samples are still split along each tensor's own axis
        return min(configured, self.batch_size) if self.batch_size else configured

    def check(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validated feeds (names, dtypes, every non-batch dimension); raises DataError."""
        return self.backend.check_feeds(feeds)

    def run(self, feeds: dict[str, np.ndarray], max_batch: int = 64) -> dict[str, np.ndarray]:
        """Outputs by name for N already-checked samples, in chunks the model takes."""
        results = run_in_batches(self.backend, feeds, self.merge_limit(max_batch))
        return {spec.name: value for spec, value in zip(self.backend.outputs, results)}

    def predict(self, feeds: dict[str, np.ndarray], max_batch: int = 64) -> dict[str, np.ndarray]:
        """Outputs by name for N samples (validated, then run in batches the model accepts)."""
        return self.run(self.check(feeds), max_batch)

    def use_integer_io(self) -> bool:
        """Serve the model's raw int8 tensors (callers quantize with the scale/zero point the metadata
        lists); False, and nothing changes, when the model has float I/O."""
        return self.backend.set_integer_io(True)

    def close(self) -> None:
        self.backend.close()


def load_model(folder: Path, manifest: dict, threads: int | None = None, instances: int = 1) -> LoadedModel:
    """Load the extracted bundle files in ``folder`` with the backend its manifest names
    (``instances``: concurrent runs the serving layer will make)."""
    runtime = manifest["runtime"]
    backend = load_backend(
        folder / manifest["model_file"], manifest["format"], threads=threads or runtime.get("threads"),
        providers=runtime.get("execution_providers"),
        input_names=[spec["name"] for spec in manifest.get("inputs", [])],
        output_names=[spec["name"] for spec in manifest.get("outputs", [])], instances=instances,
    )
    axes = {spec["name"]: spec.get("batch_axis", 0) for spec in [*manifest.get("inputs", []), *manifest.get("outputs", [])]}
    constants = (manifest.get("batch") or {}).get("constants") or {}
    if any(axis != 0 for axis in axes.values()) or constants:
        backend.set_layout(axes, constants)
    return LoadedModel(manifest["name"], manifest["version"], manifest, backend, folder)


def to_leading(arrays: dict | None, specs: list[TensorSpec]) -> dict | None:
    """``arrays`` by name with each one's samples moved to axis 0; constants left out."""
    if arrays is None:
        return None
    axes = {spec.name: spec.batch_axis for spec in specs}
    moved = {}
    for name, array in arrays.items():
        axis = axes.get(name, 0)
        if axis is not None and 0 <= axis < np.ndim(array):
            moved[name] = np.moveaxis(array, axis, 0) if axis else array
    return moved


def sample_feeds(model: LoadedModel) -> dict[str, np.ndarray] | None:
    """The bundle's smoke-test inputs from the extracted folder, checked; None when there are none."""
    samples = model.manifest.get("samples") or {}
    try:
        feeds = {name: np.load(model.folder / path, allow_pickle=False) for name, path in samples.get("inputs", {}).items()}
        return model.check(feeds) if feeds else None
    except Exception:  # noqa: BLE001 - no samples to time with
        return None


def release_freed_memory() -> None:
    """Hand memory freed by Python back to the OS (glibc keeps it otherwise, e.g. after reading a bundle)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        pass


def _cpu_hint(manifest: dict) -> str:
    """Why a bundle's int8 answers may differ on this CPU, when the manifest says what it assumed."""
    from .runtime.cpu import host_arch, host_int8_dot_product

    cpu = manifest.get("cpu") if isinstance(manifest.get("cpu"), dict) else {}
    # Only x86 without VNNI computes int8 otherwise (int16 pair sums saturate); Arm without SDOT does not.
    if (cpu.get("int8_dot_product") and cpu.get("arch") == "x86_64" == host_arch()
            and str(manifest.get("precision", "")).startswith("int8") and not host_int8_dot_product()):
        return (f" (the bundle is built for profile {manifest.get('profile')!r}, whose CPU has int8 dot products "
                "(VNNI); this one has none and computes its int8 layers differently: install a bundle "
                "converted for this CPU's profile, e.g. x86-64)")
    return ""


def _warn_cpu(manifest: dict) -> None:
    """A bundle whose few samples agree may still compute other answers here: say so (once per load)."""
    hint = _cpu_hint(manifest)
    if hint:
        logging.getLogger("edgepack.agent").warning("int8 arithmetic differs on this CPU" + hint)


#: the share of a probability map's values that may lie outside the smoke test's tolerance. A steep head
#: (DBNet's binarization, sigmoid(50 x)) turns the one-step int8 rounding flips that another CPU's float
#: kernels cause upstream (another summation order) into a few far-off pixels: 0.9% of one 320x320 map
#: on an AMD EPYC with AVX-512 under ORT_ENABLE_ALL's NCHWc layout, none under ORT_ENABLE_EXTENDED. The
#: gate judged the map by its IoU and cosine, which a few pixels do not move; saturated int8 moves far more.
MAP_FAR_FRACTION = 0.02


def _output_kinds(manifest: dict) -> dict[str, str]:
    """What the gate judged each output as (``classes``, ``map``...), from the manifest's metrics."""
    metrics = manifest.get("metrics") if isinstance(manifest.get("metrics"), dict) else {}
    outputs = metrics.get("outputs") if isinstance(metrics.get("outputs"), list) else []
    return {entry["name"]: entry.get("kind") for entry in outputs if isinstance(entry, dict) and "name" in entry}


def tolerance_miss(expected: np.ndarray, got: np.ndarray, tolerance: dict, kind: str | None) -> str | None:
    """How a float output misses its smoke-test tolerance (None when it does not): every value within
    ``atol``/``rtol``, but for a probability map all but ``MAP_FAR_FRACTION`` of them."""
    far = ~np.isclose(got, expected, atol=tolerance.get("atol", 1e-4), rtol=tolerance.get("rtol", 1e-3))
    if not far.any() or (kind == "map" and far.mean() <= MAP_FAR_FRACTION):
        return None
    return f"by up to {float(np.max(np.abs(got - expected))):.3g} in {far.mean():.2%} of its values"


def smoke_test(model: LoadedModel, bundle: Bundle) -> None:
    """Run the bundle's sample inputs and compare with its expected outputs; raise StoreError on a miss.

    Also measures ``model.sample_seconds`` (the serving layer sizes its queue from it)."""
    samples = model.manifest.get("samples")
    if not samples:
        _warn_cpu(model.manifest)
        return
    feeds = {name: bundle.read_array(path) for name, path in samples["inputs"].items()}
    try:
        checked = model.check(feeds)
        # One sample at a time: a batch of samples would grow the runtime's memory arena for good.
        started = time.perf_counter()
        outputs = model.run(checked, max_batch=1)
        count = max(1, model.backend.count(checked))
        # The first run pays for warm-up (allocations, kernel selection), and one timing is noise: the
        # fastest of a few more runs (at most ~0.3 s of them) is what an update's probation compares.
        timings, spent = [], time.perf_counter() - started
        while len(timings) < 5 and spent < 0.3:
            began = time.perf_counter()
            model.run(checked, max_batch=1)
            timings.append(time.perf_counter() - began)
            spent += timings[-1]
        model.sample_seconds = min(timings or [spent]) / count
    except Exception as exc:
        raise StoreError(f"smoke test failed: the model cannot run its sample inputs ({exc})") from None
    kinds = _output_kinds(model.manifest)
    for name, path in samples["outputs"].items():
        expected, got = bundle.read_array(path), np.asarray(outputs.get(name))
        tolerance = samples.get("tolerance", {}).get(name, {})
        if expected.shape != got.shape:
            raise StoreError(f"smoke test failed: output {name!r} has shape {got.shape}, expected {expected.shape}")
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            raise StoreError(f"smoke test failed: output {name!r} holds NaN/Inf")
        if tolerance.get("exact") or expected.dtype.kind != "f":
            if not np.array_equal(expected.astype(got.dtype) if expected.dtype.kind != "U" else expected, got):
                raise StoreError(f"smoke test failed: output {name!r} differs from the bundle's expected output")
        else:
            problem = tolerance_miss(expected, got, tolerance, kinds.get(name))
            if problem:
                raise StoreError(f"smoke test failed: output {name!r} differs from the expected output {problem}"
                                 + _cpu_hint(model.manifest))
    _warn_cpu(model.manifest)
