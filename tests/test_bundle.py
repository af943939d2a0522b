"""The bundle format: determinism, integrity, signatures, and refusal of every kind of bad bundle."""

from __future__ import annotations

import io
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgepack.bundle import BundleWriter, open_bundle
from edgepack.bundle.format import canonical_json
from edgepack.bundle.sign import sign_bundle
from edgepack.bundle.signing import generate_keys, load_public_key
from edgepack.errors import BundleError, EdgepackError, SignatureError

MANIFEST = {
    "name": "tiny", "version": "1.0.0", "profile": "x86-64", "runtime": {"name": "onnxruntime", "min_version": "1.17"},
    "format": "onnx", "precision": "fp32", "model_file": "model/model.onnx",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}], "outputs": [],
}


def make_bundle(path: Path, model: bytes = b"not really onnx" * 100) -> Path:
    writer = BundleWriter()
    writer.add_bytes("model/model.onnx", model)
    writer.add_array("samples/input_0.npy", np.arange(8, dtype=np.float32).reshape(2, 4))
    writer.write(path, MANIFEST)
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    private, public = generate_keys(folder)
    other = tmp_path_factory.mktemp("other")
    other_private, other_public = generate_keys(other)
    return private, load_public_key(public), other_private, load_public_key(other_public)


def test_same_content_same_bytes(tmp_path):
    first = make_bundle(tmp_path / "a.edgepack").read_bytes()
    second = make_bundle(tmp_path / "b.edgepack").read_bytes()
    assert first == second
    assert make_bundle(tmp_path / "c.edgepack", b"other").read_bytes() != first


def test_roundtrip_and_hashes(tmp_path):
    with open_bundle(make_bundle(tmp_path / "a.edgepack")) as bundle:
        assert bundle.name == "tiny" and bundle.version == "1.0.0"
        assert bundle.read_array("samples/input_0.npy").shape == (2, 4)
        assert set(bundle.manifest["files"]) == {"model/model.onnx", "samples/input_0.npy"}
        entry = bundle.manifest["files"]["model/model.onnx"]
        assert entry["size"] == 1500 and len(entry["sha256"]) == 64


def test_sign_and_verify(tmp_path, keys):
    private, public, other_private, other_public = keys
    path = make_bundle(tmp_path / "a.edgepack")
    with pytest.raises(SignatureError, match="not signed"):
        open_bundle(path, public_keys=[public])
    sign_bundle(path, private)
    with open_bundle(path, public_keys=[public]) as bundle:
        assert bundle.signed_by
    with pytest.raises(SignatureError, match="does not match any trusted key"):
        open_bundle(path, public_keys=[other_public])
    # Signing is deterministic too (ed25519 signatures are).
    again = make_bundle(tmp_path / "b.edgepack")
    sign_bundle(again, private)
    assert again.read_bytes() == path.read_bytes()


def _refused(path: Path, key) -> bool:
    try:
        open_bundle(path, public_keys=[key] if key else None).close()
    except EdgepackError:
        return True
    return False


@pytest.mark.parametrize("signed", [False, True])
def test_every_flipped_byte_is_refused(tmp_path, keys, signed):
    private, public = keys[0], keys[1]
    source = make_bundle(tmp_path / "a.edgepack")
    if signed:
        sign_bundle(source, private)
    data = source.read_bytes()
    rng = random.Random(0)
    # Every header byte (start and the central directory at the end) and a random sample in between.
    offsets = set(range(0, 200)) | set(range(len(data) - 600, len(data))) | set(rng.sample(range(len(data)), 400))
    target = tmp_path / "flipped.edgepack"
    missed = []
    for offset in sorted(o for o in offsets if 0 <= o < len(data)):
        flipped = bytearray(data)
        flipped[offset] ^= 0x01
        target.write_bytes(flipped)
        if not _refused(target, public if signed else None):
            missed.append(offset)
    assert missed == []


def test_truncated_and_extended_are_refused(tmp_path):
    data = make_bundle(tmp_path / "a.edgepack").read_bytes()
    target = tmp_path / "bad.edgepack"
    for variant in (data[:-1], data[: len(data) // 2], data + b"\0", b"\0" + data, b""):
        target.write_bytes(variant)
        with pytest.raises(EdgepackError):
            open_bundle(target)


def _raw_zip(path: Path, members: dict[str, bytes], mode_bits: dict[str, int] | None = None) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = (mode_bits or {}).get(name, 0o100644) << 16
            archive.writestr(info, data)
    path.write_bytes(buffer.getvalue())
    return path


def _manifest_for(files: dict[str, bytes], **changes) -> bytes:
    import hashlib

    manifest = {**MANIFEST, "schema": "edgepack.bundle/v1", **changes}
    manifest["files"] = {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
    return canonical_json(manifest)


@pytest.mark.parametrize("case, message", [
    ("traversal", "path traversal"),
    ("absolute", "absolute"),
    ("symlink", "link"),
    ("pickle", "pickled"),
    ("pickle_bytes", "pickled"),
    ("object_npy", "plain numpy array"),
    ("extra_member", "not in its manifest"),
    ("missing_member", "lacks files"),
    ("bad_schema", "not supported"),
])
def test_malicious_members_refused(tmp_path, case, message):
    model = b"model"
    files = {"model/model.onnx": model}
    members: dict[str, bytes] = {}
    modes = {}
    if case == "traversal":
        files["../evil.txt"] = b"x"
    elif case == "absolute":
        files["/etc/evil"] = b"x"
    elif case == "symlink":
        files["model/link"] = b"/etc/passwd"
        modes["model/link"] = 0o120777
    elif case == "pickle":
        files["model/weights.pkl"] = pickle.dumps({"a": 1})
    elif case == "pickle_bytes":
        files["samples/input_0.npy"] = pickle.dumps([1, 2, 3])
    elif case == "object_npy":
        buffer = io.BytesIO()
        np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        files["samples/input_0.npy"] = buffer.getvalue()
    manifest = _manifest_for(files, **({"schema": "edgepack.bundle/v99"} if case == "bad_schema" else {}))
    members["manifest.json"] = manifest
    members.update(files)
    if case == "extra_member":
        members["sneaky.bin"] = b"x"
    if case == "missing_member":
        del members["model/model.onnx"]
    path = _raw_zip(tmp_path / f"{case}.edgepack", members, modes)
    with pytest.raises(BundleError, match=message) as error:
        bundle = open_bundle(path)
        bundle.read_array("samples/input_0.npy")
    assert "\n" not in str(error.value)


def test_verify_cli_and_exit_codes(tmp_path, keys):
    from .conftest import run_cli

    private, _, _, _ = keys
    path = make_bundle(tmp_path / "a.edgepack")
    public_file = Path(private).with_name("edgepack-signing.pub")
    assert run_cli("verify", path).returncode == 0
    unsigned = run_cli("verify", path, "--key", public_file)
    assert unsigned.returncode == 1 and "not signed" in unsigned.stderr
    assert run_cli("sign", path, "--key", private).returncode == 0
    assert run_cli("verify", path, "--key", public_file).returncode == 0
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(data)
    broken = run_cli("verify", path, "--key", public_file)
    assert broken.returncode == 1 and broken.stderr.startswith("error:") and "Traceback" not in broken.stderr
    inspect = run_cli("inspect", tmp_path / "missing.edgepack")
    assert inspect.returncode == 2 and "does not exist" in inspect.stderr


@pytest.mark.parametrize("member", ["manifest.json", "signatures.json"])
def test_deeply_nested_json_is_a_one_line_error(tmp_path, keys, member):
    """JSON nested 100 000 deep (RecursionError in the parser) in the manifest or the signatures:
    `edgepack verify` and `edgepack-agent run --bundle` refuse it in one line, no traceback."""
    from .conftest import run_cli

    private, _, _, _ = keys
    public_file = Path(private).with_name("edgepack-signing.pub")
    deep = b"[" * 100_000 + b"]" * 100_000
    files = {"model/model.onnx": b"model"}
    members = {"manifest.json": deep if member == "manifest.json" else _manifest_for(files), **files}
    if member == "signatures.json":
        members["signatures.json"] = b'{"schema": "edgepack.signatures/v1", "signatures": ' + deep + b"}"
    path = _raw_zip(tmp_path / "deep.edgepack", members)
    expected = "not valid JSON" if member == "manifest.json" else "signatures.json"
    for result, reason in ((run_cli("verify", path, "--key", public_file), "signatures.json|not signed"),
                           (run_cli("inspect", path), expected),
                           (run_cli("run", "--bundle", path, "--port", "0", program="edgepack-agent"), expected)):
        assert result.returncode in (1, 2), result.stderr
        assert "Traceback" not in result.stderr and "RecursionError" not in result.stderr, result.stderr[-500:]
        lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("{")]  # agent logs: JSON
        assert len(lines) == 1 and lines[0].startswith("error:"), lines
        assert any(word in lines[0] for word in reason.split("|")), lines[0]


@pytest.mark.parametrize("changes, field", [
    ({"runtime": {"name": "onnxruntime", "threads": 0}}, "runtime.threads"),
    ({"runtime": {"name": "tensorflow"}}, "runtime.name"),
    ({"inputs": [{"name": "x", "dtype": "float32", "shape": ["a", 4]}]}, "inputs.0.shape"),
    ({"inputs": [{"name": "x", "dtype": "complex256", "shape": [None, 4]}]}, "inputs.0.dtype"),
    ({"samples": {"count": 1, "inputs": {"x": "samples/input_0.npy"}, "outputs": {},
                  "tolerance": {"y": {"atol": -1}}}}, "samples.tolerance.y.atol"),
    ({"samples": {"count": 1, "inputs": {"x": "samples/missing.npy"}, "outputs": {}}}, "samples.inputs.x"),
    ({"batch": {"mode": "fixed", "invariant": True}}, "batch"),
    ({"format": "pickle"}, "format"),
])
def test_signed_but_malformed_manifest_is_refused_with_the_field_named(tmp_path, keys, changes, field):
    """The signature is valid (the builder held a trusted key) but the manifest does not fit the schema."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from edgepack.bundle.signing import sign_manifest

    private, public, _, _ = keys
    files = {"model/model.onnx": b"model", "samples/input_0.npy": _npy(np.zeros((1, 4), np.float32))}
    manifest = _manifest_for(files, **changes)
    key = load_pem_private_key(Path(private).read_bytes(), None)
    members = {"manifest.json": manifest, "signatures.json": canonical_json(sign_manifest(manifest, key)), **files}
    path = _raw_zip(tmp_path / "malformed.edgepack", members)
    with pytest.raises(BundleError) as error:
        open_bundle(path, public_keys=[load_public_key(Path(private).with_name("edgepack-signing.pub"))])
    message = str(error.value)
    assert message.startswith("manifest.json: ") and field in message and "\n" not in message, message


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_a_typed_manifest_writes_what_was_given_and_no_defaults(tmp_path):
    """The converter builds a typed Manifest; its dict has the keys given (nulls where given), no more."""
    from edgepack.bundle import SCHEMA
    from edgepack.bundle.manifest import Batch, Manifest, Samples, Tolerance

    writer = BundleWriter()
    writer.add_bytes("model/model.onnx", b"model")
    writer.add_array("samples/input_0.npy", np.zeros((1, 4), np.float32))
    given = {**MANIFEST, "schema": SCHEMA, "files": writer.file_entries(), "preprocessing": None, "drift": None}
    manifest = Manifest(**{**given, "samples": Samples(count=1, inputs={"x": "samples/input_0.npy"}, outputs={},
                                                       tolerance={"y": Tolerance(exact=True)}),
                           "batch": Batch(mode="dynamic", size=None, invariant=True)})
    data = manifest.to_dict()
    assert data == {**given, "samples": {"count": 1, "inputs": {"x": "samples/input_0.npy"}, "outputs": {},
                                         "tolerance": {"y": {"exact": True}}},
                    "batch": {"mode": "dynamic", "size": None, "invariant": True}}
    writer.write(tmp_path / "a.edgepack", data)
    with open_bundle(tmp_path / "a.edgepack") as bundle:
        assert bundle.manifest == data
