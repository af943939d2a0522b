"""Op coverage: which ops of a graph the profile's runtime or execution provider cannot run.

Checked before conversion, so a user learns it on the workstation rather than on the device: the
opset against what the device's runtime version reads, the accelerator's unsupported ops (nodes that
would fall back to the CPU, or fail), and, for ONNX Runtime, whether this host's CPU build has a
kernel for every node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import first_line
from edgepack.profiles import Profile


@dataclass
class CoverageReport:
    """Findings for one graph on one profile: ``errors`` stop the ONNX path, ``warnings`` do not."""

    profile: str
    opset: int
    ops: list[str]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"opset": self.opset, "ops": self.ops, "errors": self.errors, "warnings": self.warnings}


def graph_ops(path: Path) -> tuple[int, list[tuple[str, str]]]:
    """The default-domain opset and the sorted (domain, op_type) pairs of a graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    ops = sorted({(node.domain or "ai.onnx", node.op_type) for node in model.graph.node})
    return opset, ops


def _matches(pattern: str, domain: str, op: str) -> bool:
    if ":" in pattern:
        want_domain, _, want_op = pattern.partition(":")
        return want_domain == domain and want_op in ("*", op)
    return pattern == op


def check_coverage(path: Path, profile: Profile) -> CoverageReport:
    """Check the graph at ``path`` against the profile's ONNX Runtime entry."""
    opset, ops = graph_ops(path)
    report = CoverageReport(profile.name, opset, [f"{d}:{o}" if d != "ai.onnx" else o for d, o in ops])
    runtime = profile.runtime("onnxruntime")
    if runtime is None:
        report.errors.append(f"profile {profile.name} has no ONNX Runtime")
        return report
    if runtime.max_opset and opset > runtime.max_opset:
        report.warnings.append(
            f"graph uses opset {opset}; onnxruntime {runtime.min_version} on {profile.name} reads up to "
            f"{runtime.max_opset}: the graph is converted down to {runtime.max_opset}"
        )
    accelerated = [p for p in runtime.execution_providers if p != "CPUExecutionProvider"]
    for domain, op in ops:
        blocked = [pattern for pattern in runtime.unsupported_ops if _matches(pattern, domain, op)]
        if blocked and accelerated:
            report.warnings.append(f"{domain}:{op} is not supported by {accelerated[0]}; those nodes fall back to the CPU")
        elif blocked:
            report.errors.append(f"{domain}:{op} is not supported by onnxruntime on {profile.name}")
    report.errors.extend(_host_kernel_check(path))
    return report


def _host_kernel_check(path: Path) -> list[str]:
    """Load the graph in this host's ONNX Runtime: a node without a CPU kernel fails here too."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        text = first_line(exc)
        return [f"ONNX Runtime (CPU) cannot run the graph: {text[:300]}"]
    return []


def check_tflite_coverage(ops: set[str], profile: Profile, min_runtime: str | None = None) -> CoverageReport:
    """Check a .tflite file's op names against the profile's LiteRT entry.

    Ops listed in the runtime's ``unsupported_ops`` are missing from the device's LiteRT build (an
    older tflite-runtime, a trimmed build); ``Flex*`` ops need TensorFlow's select-ops delegate, which
    no LiteRT wheel has. Ops XNNPACK does not take still run on LiteRT's own CPU kernels, so the
    delegate itself is not a reason to refuse. ``min_runtime`` is the file's own ``min_runtime_version``
    (written by the converter from its op versions); a device on the older ``tflite-runtime`` package
    must be at least that version.
    """
    report = CoverageReport(profile.name, 0, sorted(ops))
    runtime = profile.runtime("litert")
    if runtime is None:
        report.errors.append(f"profile {profile.name} has no LiteRT runtime, so it cannot run a .tflite model")
        return report
    for op in sorted(ops):
        if op.startswith("Flex"):
            report.errors.append(
                f"{op} is a TensorFlow select op (Flex delegate); LiteRT on {profile.name} cannot run it: "
                "convert the model with builtin ops only"
            )
        elif any(_matches(pattern, "tflite", op) for pattern in runtime.unsupported_ops):
            report.errors.append(f"{op} is not supported by LiteRT {runtime.min_version} on {profile.name}")
    if min_runtime and runtime.package == "tflite-runtime" and _version(min_runtime) > _version(runtime.min_version):
        report.errors.append(
            f"the model needs TensorFlow Lite >= {min_runtime} (its op versions); tflite-runtime {runtime.min_version} "
            f"on {profile.name} is older: upgrade the device to ai-edge-litert or use an ONNX recipe"
        )
    return report


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def tflite_min_runtime(path: Path) -> str | None:
    """The ``min_runtime_version`` a TFLite converter wrote into the file's metadata, if any."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        return None
    data = Path(path).read_bytes()
    model = schema.Model.GetRootAsModel(data, 0)
    for index in range(model.MetadataLength()):
        entry = model.Metadata(index)
        if entry.Name() == b"min_runtime_version":
            raw = model.Buffers(entry.Buffer()).DataAsNumpy()
            text = bytes(raw).split(b"\0")[0].decode(errors="replace") if not isinstance(raw, int) else ""
            return text or None
    return None
