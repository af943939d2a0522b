"""Loading a MODEL argument and exporting it to a float ONNX graph with a reference to compare against.

Every source kind yields a ``SourceModel``: the exported fp32 ONNX file, the input/output specs, and a
``reference`` callable that runs the *original* model (PyTorch, scikit-learn, or the original ONNX
graph) so that the accuracy gate compares every candidate with what the user trained.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgepack.bundle.format import sha256_file
from edgepack.errors import ConversionError, InputFileError, UsageError, first_line
from edgepack.tensors import TensorSpec

log = logging.getLogger(__name__)

Reference = Callable[[dict[str, np.ndarray]], list[np.ndarray]]

#: The opset torch exports to; profiles with an older runtime get a down-converted graph.
EXPORT_OPSET = 18


@dataclass
class SourceModel:
    """An original model, exported to fp32 ONNX, with a way to run the original."""

    kind: str
    spec: str
    sha256: str
    onnx_path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    reference: Reference
    notes: list[str] = field(default_factory=list)
    tools: dict = field(default_factory=dict)
    #: the original torch module (torch.export / factory sources), for the TFLite recipes
    torch_module: object = None
    #: for a .tflite source: the original model (``--reference``) that ``reference`` runs; None when
    #: ``reference`` runs the .tflite itself and the accuracy gate has nothing to compare with
    compared_with: str | None = None
    #: the batch the original must be run at (it was exported or traced at it); None: any batch
    reference_batch: int | None = None


def parse_input_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """``NAME=1,3,224,224`` options to a dict; a clear error for anything else."""
    shapes = {}
    for value in values:
        name, sep, dims = value.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(",")) if sep and name else None
        except ValueError:
            shape = None
        if not shape or any(d <= 0 for d in shape):
            raise UsageError(f"--input-shape {value!r} is malformed; use NAME=D1,D2,... e.g. input=1,3,224,224")
        shapes[name.strip()] = shape
    return shapes


def file_sha256(path: Path) -> str:
    """Hex sha256 of the source model file."""
    return sha256_file(path)


def detect_kind(model: str) -> str:
    """The source kind of a MODEL argument (DESIGN.md section 3)."""
    path = Path(model)
    suffix = path.suffix.lower()
    kinds = {".onnx": "onnx", ".pt2": "torch-export", ".pt": "torchscript", ".pth": "torchscript",
             ".pkl": "sklearn", ".joblib": "sklearn", ".tflite": "tflite"}
    if suffix in kinds:
        if not path.is_file():
            raise InputFileError(f"model file {model} does not exist; check the path")
        return kinds[suffix]
    if ":" in model and not path.exists():
        return "torch-factory"
    if path.exists():
        raise InputFileError(
            f"unknown model format {suffix or '(no extension)'!r} for {model}; use .onnx, .pt2, .pt, .pkl, "
            ".joblib, .tflite or package.module:factory"
        )
    raise InputFileError(f"model file {model} does not exist; check the path (or use package.module:factory)")


def load_source(model: str, workdir: Path, input_shapes: dict[str, tuple[int, ...]], max_opset: int | None = None,
                reference: str | None = None) -> SourceModel:
    """Load MODEL and export it to ``workdir/source.onnx``.

    ``max_opset``: the oldest runtime among the target profiles reads up to this opset; exporters that
    can target it directly do (converting down afterwards is not possible for every op).
    ``reference``: for a .tflite MODEL, the original model it was made from (the accuracy gate's reference).
    """
    kind = detect_kind(model)
    if reference and kind != "tflite":
        raise UsageError("--reference is for a .tflite MODEL (the original it was made from); other models are their own reference")
    if kind == "tflite":
        return _load_tflite(model, workdir, input_shapes, reference)
    if kind == "torchscript":
        return _load_torchscript(model, workdir, input_shapes, max_opset)
    loader = {
        "onnx": _load_onnx,
        "torch-export": _load_torch_export,
        "torchscript": _load_torchscript,
        "torch-factory": _load_torch_factory,
        "sklearn": _load_sklearn,
    }.get(kind)
    if loader is None:
        raise UsageError(f"{kind} models cannot be converted to ONNX targets by this version of edgepack")
    return loader(model, workdir, input_shapes)


# --- ONNX -------------------------------------------------------------------------------------------

def _ort_reference(path: Path) -> Reference:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # its failures are reported as one line; no runtime log on the console
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def specs_from_onnx(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "float32"
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        return TensorSpec(value.name, dtype, dims)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in model.graph.output]


def _load_onnx(model: str, workdir: Path, input_shapes) -> SourceModel:
    import onnx

    path = Path(model)
    target = workdir / "source.onnx"
    try:
        loaded = onnx.load(str(path))
        onnx.checker.check_model(loaded)
    except Exception as exc:
        raise InputFileError(f"{path.name} is not a valid ONNX model ({first_line(exc, 200)})") from None
    onnx.save(loaded, str(target))
    inputs, outputs = specs_from_onnx(target)
    inputs = _apply_shape_overrides(inputs, input_shapes)
    declared = inputs[0].shape[0] if inputs and inputs[0].shape else None
    return SourceModel("onnx", str(path), file_sha256(path), target, inputs, outputs, _ort_reference(path),
                       tools={"onnx": onnx.__version__}, reference_batch=declared)


def _apply_shape_overrides(inputs: list[TensorSpec], shapes: dict) -> list[TensorSpec]:
    names = {spec.name for spec in inputs}
    unknown = [name for name in shapes if name not in names]
    if unknown:
        raise UsageError(f"--input-shape names {unknown} but the model's inputs are {sorted(names)}")
    result = []
    for spec in inputs:
        if spec.name in shapes:
            shape = shapes[spec.name]
            if len(shape) != len(spec.shape) or any(w is not None and w != g for w, g in zip(spec.shape, shape)):
                raise UsageError(f"--input-shape {spec.name}={','.join(map(str, shape))} does not fit the model's {spec.describe()}")
        result.append(spec)
    return result


# --- PyTorch ----------------------------------------------------------------------------------------

def _torch_reference(module) -> Reference:
    import torch

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            result = module(*[torch.from_numpy(np.ascontiguousarray(a)) for a in feeds.values()])
        return [t.detach().numpy() for t in _flatten_outputs(result)]

    return run


def _flatten_outputs(result) -> list:
    if isinstance(result, (list, tuple)):
        return [t for item in result for t in _flatten_outputs(item)]
    if isinstance(result, dict):
        return [t for key in result for t in _flatten_outputs(result[key])]
    return [result]


def _example_inputs(input_shapes: dict, default_names: list[str] | None = None):
    import torch

    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(*shape, generator=generator) for name, shape in input_shapes.items()}


def _check_runs(module, examples: dict) -> None:
    """Run the model once on the example inputs so a wrong --input-shape gets a clear message."""
    import torch

    try:
        with torch.no_grad():
            module(*examples.values())
    except Exception as exc:
        shapes = " ".join(f"{name}={','.join(map(str, t.shape))}" for name, t in examples.items())
        first = first_line(exc, 200)
        raise UsageError(f"the model fails on inputs {shapes} ({first}); check --input-shape") from None


def _export_torch(module_or_program, examples: dict, workdir: Path, notes: list[str]) -> Path:
    """Export with the dynamo exporter (dynamic batch), falling back to a fixed batch if that fails."""
    import torch

    target = workdir / "source.onnx"
    names = list(examples)
    args = tuple(examples.values())
    # torch.export specialises a dimension of size 1, so the dynamic attempt traces at batch 2.
    doubled = tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in args)
    attempts = [
        (doubled, {"dynamic_shapes": tuple({0: torch.export.Dim("batch", min=1, max=1024)} for _ in names)}),
        (args, {}),
    ]
    errors = []
    for inputs, extra in attempts:
        try:
            program = torch.onnx.export(
                module_or_program, inputs, dynamo=True, input_names=names, opset_version=EXPORT_OPSET,
                verbose=False, **extra,
            )
            program.save(str(target))
            if not extra:
                notes.append(f"batch dimension fixed: the model did not export with a dynamic batch ({errors[-1][:160]})")
            return target
        except Exception as exc:  # the exporter raises many types; the first line says what failed
            errors.append(_plain(first_line(exc)))
    raise ConversionError(f"torch.onnx.export failed: {errors[-1]}")


def _plain(text: str) -> str:
    """``text`` without terminal colour codes (the exporter colours its messages)."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _quiet_torch():
    # The dynamo exporter prints progress lines and warnings on stdout; the CLI has its own progress.
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "torch._subclasses", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # torch 2.13's own pytree code trips its LeafSpec deprecation when a program is loaded or exported.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)


def _load_torch_export(model: str, workdir: Path, input_shapes) -> SourceModel:
    import torch

    _quiet_torch()
    path = Path(model)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise InputFileError(f"{path.name} is not a torch.export program ({first_line(exc, 200)})") from None
    signature_names = [spec.arg.name for spec in program.graph_signature.input_specs
                       if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    examples = getattr(program, "example_inputs", None)
    if input_shapes:
        if len(input_shapes) != len(signature_names):
            raise UsageError(f"the program takes {len(signature_names)} inputs; give one --input-shape per input")
        feeds = _example_inputs(input_shapes)
    elif examples and examples[0]:
        feeds = {name: t for name, t in zip(signature_names, examples[0])}
    else:
        raise UsageError(f"{path.name} carries no example inputs; give --input-shape NAME=D1,D2,...")
    _check_runs(program.module(), feeds)
    notes: list[str] = []
    fixed = _program_batch(program)
    # A program exported at a fixed batch cannot be given a symbolic one as it is; its module can be
    # exported again (the pipeline then checks the result against the original sample by sample).
    onnx_path = _export_torch(program.module() if fixed else program, feeds, workdir, notes)
    inputs, outputs = specs_from_onnx(onnx_path)
    return SourceModel("torch-export", str(path), file_sha256(path), onnx_path, inputs, outputs,
                       _torch_reference(program.module()), notes, {"torch": torch.__version__}, program.module(),
                       reference_batch=fixed)


def _program_batch(program) -> int | None:
    """The fixed batch of a torch.export program's first user input, None when it is symbolic."""
    import torch

    user = {spec.arg.name for spec in program.graph_signature.input_specs
            if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            value = node.meta.get("val")
            shape = getattr(value, "shape", None)
            if shape is None or not len(shape):
                return None
            return int(shape[0]) if isinstance(shape[0], int) else None
    return None


def _load_torchscript(model: str, workdir: Path, input_shapes, max_opset: int | None = None) -> SourceModel:
    import torch

    path = Path(model)
    if not input_shapes:
        raise UsageError("a TorchScript model needs its input shapes: add --input-shape NAME=D1,D2,...")
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise InputFileError(
            f"{path.name} is not a TorchScript model ({first_line(exc, 160)}); "
            "save with torch.jit.save, or export with torch.export and pass a .pt2"
        ) from None
    feeds = _example_inputs(input_shapes)
    _check_runs(module, feeds)
    target = workdir / "source.onnx"
    names = list(feeds)
    try:
        # TorchScript modules cannot go through torch.export, so the TorchScript exporter is used.
        torch.onnx.export(module, tuple(feeds.values()), str(target), dynamo=False, input_names=names,
                          opset_version=min(17, max_opset or 17), dynamic_axes={n: {0: "batch"} for n in names})
    except Exception as exc:
        raise ConversionError(f"torch.onnx.export of the TorchScript model failed: {first_line(exc, 300)}") from None
    inputs, outputs = specs_from_onnx(target)
    # A trace may have its batch baked in: the original runs at the traced batch only.
    return SourceModel("torchscript", str(path), file_sha256(path), target, inputs, outputs,
                       _torch_reference(module), [], {"torch": torch.__version__},
                       reference_batch=_first_batch(input_shapes))


def _first_batch(input_shapes: dict) -> int | None:
    first = next(iter(input_shapes.values()), None)
    return int(first[0]) if first else None


def _load_torch_factory(model: str, workdir: Path, input_shapes) -> SourceModel:
    import torch

    _quiet_torch()
    module_name, _, attribute = model.partition(":")
    if not input_shapes:
        raise UsageError("a module:factory model needs its input shapes: add --input-shape NAME=D1,D2,...")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise InputFileError(f"cannot import {model}: {exc}; check the module path and the factory name") from None
    try:
        module = factory()
    except Exception as exc:
        raise ConversionError(f"{model}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise InputFileError(f"{model}() returned {type(module).__name__}, not a torch.nn.Module")
    module = module.eval()
    feeds = _example_inputs(input_shapes)
    _check_runs(module, feeds)
    notes: list[str] = []
    onnx_path = _export_torch(module, feeds, workdir, notes)
    inputs, outputs = specs_from_onnx(onnx_path)
    source_file = Path(importlib.import_module(module_name).__file__ or "")
    digest = hashlib.sha256(model.encode())
    if source_file.is_file():
        digest.update(source_file.read_bytes())
    for tensor in module.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return SourceModel("torch-factory", model, digest.hexdigest(), onnx_path, inputs, outputs,
                       _torch_reference(module), notes, {"torch": torch.__version__}, module,
                       reference_batch=_first_batch(input_shapes))


# --- TFLite (packaged as it is) ---------------------------------------------------------------------

def _load_tflite(model: str, workdir: Path, input_shapes, reference: str | None) -> SourceModel:
    """A .tflite file: read its I/O; the reference is ``--reference`` when given, else the file itself."""
    from edgepack.errors import RuntimeBackendError

    from .evaluation import LiteRTBackend  # not at the top: evaluation imports this module

    path = Path(model)
    try:
        backend = LiteRTBackend(path)
    except RuntimeBackendError as exc:
        raise InputFileError(f"{path.name} cannot be loaded as a TFLite model ({exc}); check the file") from None
    inputs, outputs = list(backend.inputs), list(backend.outputs)
    if input_shapes:
        raise UsageError("a .tflite model declares its input shapes; drop --input-shape")
    tools = package_versions("ai-edge-litert", "tflite-runtime")
    notes = ["packaged as given: a .tflite MODEL is not re-converted or re-quantized"]
    if reference is None:
        from .evaluation import run_in_batches

        return SourceModel("tflite", str(path), file_sha256(path), None, inputs, outputs,
                           lambda feeds: run_in_batches(backend, feeds), notes, tools)
    folder = workdir / "reference"
    folder.mkdir(parents=True, exist_ok=True)
    original = load_source(reference, folder, {})
    if len(original.inputs) != len(inputs) or len(original.outputs) != len(outputs):
        raise UsageError(
            f"--reference {Path(reference).name} has {len(original.inputs)} inputs / {len(original.outputs)} outputs, "
            f"{path.name} has {len(inputs)} / {len(outputs)}: give the model the .tflite was made from"
        )
    for mine, theirs in zip(inputs, original.inputs):
        if len(mine.shape) != len(theirs.shape) or any(a and b and a != b for a, b in zip(mine.shape[1:], theirs.shape[1:])):
            raise UsageError(
                f"--reference {Path(reference).name} takes {theirs.describe()} but {path.name} takes {mine.describe()}; "
                "the gate needs the same input layout (e.g. NCHW vs NHWC)"
            )
    # The bundle keeps the original's tensor names, as for a model edgepack converted itself.
    inputs = [TensorSpec(o.name, m.dtype, m.shape, m.quantization) for m, o in zip(inputs, original.inputs)]
    outputs = [TensorSpec(o.name, m.dtype, m.shape, m.quantization) for m, o in zip(outputs, original.outputs)]
    notes.append(f"accuracy gate: compared with --reference {Path(reference).name} ({original.kind})")
    return SourceModel("tflite", str(path), file_sha256(path), None, inputs, outputs, original.reference,
                       notes + original.notes, tools | original.tools, compared_with=Path(reference).name,
                       reference_batch=original.reference_batch)


def package_versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``packages`` (for a bundle's ``tools``); ones not installed are left out."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


# --- scikit-learn -----------------------------------------------------------------------------------

def _load_sklearn(model: str, workdir: Path, input_shapes) -> SourceModel:
    import joblib
    import onnx
    import skl2onnx
    import sklearn
    from skl2onnx.common.data_types import FloatTensorType

    path = Path(model)
    try:
        # Unpickling runs code: it happens here, on the host, on the user's own file; never on a device.
        estimator = joblib.load(path)
    except Exception as exc:
        raise InputFileError(f"{path.name} could not be unpickled as a scikit-learn model ({type(exc).__name__}: {exc})") from None
    if not hasattr(estimator, "predict") and not hasattr(estimator, "transform"):
        raise InputFileError(f"{path.name} holds a {type(estimator).__name__}, not a scikit-learn estimator")
    features = getattr(estimator, "n_features_in_", None)
    if input_shapes:
        features = list(input_shapes.values())[0][-1]
    if not features:
        raise UsageError(f"cannot tell how many features {path.name} takes; add --input-shape input=1,N")
    classifier = hasattr(estimator, "predict_proba")
    options = {id(estimator): {"zipmap": False}} if classifier else None
    try:
        proto = skl2onnx.convert_sklearn(
            estimator, initial_types=[("input", FloatTensorType([None, int(features)]))],
            options=options, target_opset={"": 17, "ai.onnx.ml": 3},
        )
    except Exception as exc:
        raise ConversionError(f"skl2onnx cannot convert {type(estimator).__name__}: {first_line(exc, 300)}") from None
    target = workdir / "source.onnx"
    onnx.save(proto, str(target))
    inputs, outputs = specs_from_onnx(target)

    def reference(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        features_in = next(iter(feeds.values()))
        if classifier:
            return [np.asarray(estimator.predict(features_in)), np.asarray(estimator.predict_proba(features_in))]
        if hasattr(estimator, "predict"):
            return [np.asarray(estimator.predict(features_in))]
        return [np.asarray(estimator.transform(features_in))]

    return SourceModel("sklearn", str(path), file_sha256(path), target, inputs, outputs, reference, [],
                       {"scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx.__version__})
