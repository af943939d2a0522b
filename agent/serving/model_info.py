"""What the server says about itself and its models, in OIP v2 / Triton terms, for every door: server
and model metadata, Triton's model configuration and repository index. Plain dicts in the REST JSON
form; the gRPC door converts them to its messages."""

from __future__ import annotations

from edgepack import __version__

from .oip import CONFIG_TYPES, oip_datatype, oip_shape
from .split import served_versions

#: Protocol extensions served (the same over HTTP and gRPC). Not "model_repository": of it only the
#: index is served (models come from the store, not from load/unload calls), and a client that sees the
#: name may call load and unload.
EXTENSIONS = ["binary_tensor_data", "model_configuration", "metrics", "statistics"]


def platform(model) -> str:
    """Triton's platform name of the runtime that serves ``model``."""
    return "onnxruntime_onnx" if model.backend.runtime == "onnxruntime" else "tensorflow_lite"


def tensor_metadata(spec) -> dict:
    """One input or output as OIP model metadata lists it."""
    entry = {"name": spec.name, "datatype": oip_datatype(spec), "shape": oip_shape(spec.shape)}
    if spec.quantization and spec.dtype.startswith(("int", "uint")):
        # Raw integer I/O (integer_io): callers need the affine mapping real = (q - zero_point) * scale.
        entry["parameters"] = {"scale": spec.quantization["scale"], "zero_point": spec.quantization["zero_point"]}
    return entry


def server_metadata(registry) -> dict:
    return {"name": "edgepack-agent", "version": __version__, "extensions": EXTENSIONS,
            "models": sorted(name for name in registry.schedulers if registry.get(name))}


def roles(scheduler) -> dict[str, str]:
    """Version -> its role: ``active`` (answers requests), ``b`` (answers an A/B split's share),
    ``shadow`` (sees the inputs, answers nothing)."""
    served = {scheduler.current.version: "active"}
    if scheduler.split is not None:
        served[scheduler.split.version] = "b"
    if scheduler.shadow is not None:
        served.setdefault(scheduler.shadow.version, "shadow")
    return served


def model_metadata(scheduler) -> dict:
    """OIP model metadata; ``versions`` lists the versions that answer (the active one first), and
    ``parameters.roles`` what every loaded one does, the shadow's included (the gRPC door leaves the
    parameters out)."""
    model = scheduler.current.model
    body = {"name": scheduler.name, "versions": served_versions(scheduler), "platform": platform(model),
            "inputs": [tensor_metadata(s) for s in model.inputs],
            "outputs": [tensor_metadata(s) for s in model.outputs]}
    if scheduler.split is not None or scheduler.shadow is not None:
        body["parameters"] = {"roles": roles(scheduler)}
        if scheduler.split is not None:
            body["parameters"]["split_percent"] = scheduler.split.percent
    return body


def repository_index(registry) -> list[dict]:
    """Triton's model repository index, as tritonclient's get_model_repository_index() reads it."""
    index = []
    for name in sorted(registry.schedulers):
        scheduler = registry.get(name)
        entry = {"name": name, "state": "READY" if scheduler else "UNAVAILABLE"}
        if scheduler:
            entry["version"] = scheduler.current.version
        else:
            entry["reason"] = "no version loaded (see the agent log)"
        index.append(entry)
    return index


def model_config(scheduler) -> dict:
    """Triton's model configuration of the served version."""
    model = scheduler.current.model
    batched = scheduler.max_batch > 1 and model.mergeable  # Triton's batch is axis 0 of every tensor

    def tensors(specs):
        # Triton's config leaves the batch dimension out when max_batch_size > 0.
        return [{"name": s.name, "data_type": CONFIG_TYPES[oip_datatype(s)],
                 "dims": oip_shape(s.shape[1:] if batched else s.shape)} for s in specs]

    body = {"name": scheduler.name, "platform": platform(model), "max_batch_size": scheduler.max_batch if batched else 0,
            "input": tensors(model.inputs), "output": tensors(model.outputs),
            "instance_group": [{"count": scheduler.options.instances, "kind": "KIND_CPU"}]}
    if batched:
        body["dynamic_batching"] = {"max_queue_delay_microseconds": int(scheduler.options.batching.max_queue_delay_ms * 1000),
                                    "default_queue_policy": {"max_queue_size": scheduler.max_queue}}
    # Why requests are (not) merged: a fixed batch of the model file, outputs that depend on the batch.
    body["parameters"] = {
        "model_batch": {"string_value": str(model.batch_size) if model.batch_size else "dynamic"},
        "batch_invariant": {"string_value": "true" if model.batch_invariant else "false"},
        "max_queue_size": {"string_value": str(scheduler.max_queue)},
        "max_samples_per_request": {"string_value": str(scheduler.options.max_samples_per_request)},
    }
    return body
