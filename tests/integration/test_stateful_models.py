"""A stateful streaming model users bring: Silero VAD, as its PyPI package ships it (``silero_vad.onnx``:
``input [batch, samples]``, ``state [2, batch, 128]`` with the batch on axis 1, a rank-0 int64 ``sr``;
outputs the speech probability and the next state), on real speech (espeak-ng, recorded into
tests/data/speech-16k.wav with silence around it).

Converted with and without data for x86-64 and rpi4, installed, and served over OIP carrying the
state request by request: the served probabilities equal the original's over the whole utterance.
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from edgepack.bundle import open_bundle

from ..conftest import run_cli
from .daemon import Daemon

silero_vad = pytest.importorskip("silero_vad")
MODELS = Path(silero_vad.__file__).parent / "data"
SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech-16k.wav"
CHUNK, CONTEXT = 512, 64  # 16 kHz: 512 new samples per call, after the last 64 of the call before


def windows(path: Path = SPEECH) -> np.ndarray:
    """The utterance as the model's wrapper feeds it: [steps, 576], each chunk after its context."""
    with wave.open(str(path)) as recording:
        audio = np.frombuffer(recording.readframes(recording.getnframes()), np.int16).astype(np.float32) / 32768
    padded = np.concatenate([np.zeros(CONTEXT, np.float32), audio])
    return np.stack([padded[i * CHUNK:i * CHUNK + CHUNK + CONTEXT] for i in range(len(audio) // CHUNK)])


def original_probabilities(model: Path, steps: np.ndarray) -> np.ndarray:
    """The model run directly with ONNX Runtime (no edgepack code), its state carried."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    state, probabilities = np.zeros((2, 1, 128), np.float32), []
    for window in steps:
        probability, state = session.run(None, {"input": window[None], "state": state, "sr": np.array(16000, np.int64)})
        probabilities.append(float(probability[0, 0]))
    return np.asarray(probabilities)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vad")
    steps = windows()
    # The calibration/validation data a user would write: the windows in order (one sequence), the
    # state's samples on its own axis 1, the sample rate as a scalar.
    np.savez(folder / "speech.npz", input=steps, state=np.zeros((2, len(steps), 128), np.float32),
             sr=np.array(16000, np.int64))
    return folder, steps


@pytest.fixture(scope="module")
def bundles(speech):
    folder, _ = speech
    done = run_cli("convert", MODELS / "silero_vad.onnx", "--profile", "x86-64", "--profile", "rpi4", "--name", "vad",
                   "--calibration", folder / "speech.npz", "--out", folder / "out", "--json")
    assert done.returncode == 0, done.stderr
    return folder / "out", json.loads(done.stdout)["profiles"]


def test_converts_with_data_for_both_profiles_judged_on_the_sequence(bundles, speech):
    out, reports = bundles
    for report in reports:
        assert report["bundle"], report
        assert any("stateful: stateN feeds state" in note for note in report["notes"]), report["notes"]
        shipped = next(row for row in report["candidates"] if row["status"] == "shipped")
        outputs = {entry["name"]: entry for entry in shipped["metrics"]["outputs"]}
        assert outputs["output"]["max_abs_error"] < 1e-4 and outputs["stateN"]["cosine"] > 0.9999
    with open_bundle(out / "vad-1.0.0-x86-64.edgepack") as opened:
        manifest = opened.manifest
    # Rank 0 is a constant without saying so; the state's axis is written out.
    axes = {spec["name"]: spec.get("batch_axis", 0) if spec["shape"] else None for spec in manifest["inputs"] + manifest["outputs"]}
    assert axes == {"input": 0, "state": 1, "sr": None, "output": 0, "stateN": 1}
    assert manifest["batch"]["state"] == {"stateN": "state"}


def test_int8_error_that_accumulates_through_the_state_is_caught(speech, tmp_path):
    """The op15 export quantizes (its graph has no If); judged step by step with each model carrying its
    own state, the int8 candidate drifts away and is refused; fp32 ships."""
    folder, _ = speech
    done = run_cli("convert", MODELS / "silero_vad_16k_op15.onnx", "--profile", "x86-64", "--recipe", "onnx-int8-static",
                   "--recipe", "onnx-fp32", "--calibration", folder / "speech.npz", "--out", tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)["profiles"]
    rows = {row["recipe"]: row for row in report["candidates"]}
    assert rows["onnx-int8-static"]["status"] == "rejected", rows["onnx-int8-static"]
    assert report["chosen"] == "onnx-fp32"


def test_served_over_oip_carrying_the_state_equals_the_original(bundles, speech):
    out, _ = bundles
    _, steps = speech
    expected = original_probabilities(MODELS / "silero_vad.onnx", steps)
    assert (expected > 0.9).sum() > 20 and (expected < 0.1).sum() > 20  # speech and silence both there
    with Daemon("--bundle", out / "vad-1.0.0-x86-64.edgepack") as running:
        client = triton.InferenceServerClient(running.address)
        metadata = client.get_model_metadata("vad")
        assert {tensor["name"]: tensor["shape"] for tensor in metadata["inputs"]} == {
            "input": [-1, -1], "state": [2, -1, 128], "sr": []}
        state, served = np.zeros((2, 1, 128), np.float32), []
        for index, window in enumerate(steps):
            tensors = [triton.InferInput("input", [1, window.size], "FP32"), triton.InferInput("state", [2, 1, 128], "FP32")]
            tensors[0].set_data_from_numpy(window[None])
            tensors[1].set_data_from_numpy(state, binary_data=index % 2 == 0)  # JSON and binary tensors
            if index % 3 == 0:  # the sample rate sent as a scalar (else the bundle's default 16000)
                rate = triton.InferInput("sr", [], "INT64")
                rate.set_data_from_numpy(np.array(16000, np.int64))
                tensors.append(rate)
            answer = client.infer("vad", tensors)
            served.append(float(answer.as_numpy("output")[0, 0]))
            state = answer.as_numpy("stateN")
        print(f"served vs original over {len(steps)} windows: max abs difference {np.max(np.abs(np.subtract(served, expected))):.2e}")
        np.testing.assert_allclose(served, expected, atol=1e-4)
        # Two streams in one request: the batch on axis 0 of input and axis 1 of state.
        both = [triton.InferInput("input", [2, steps.shape[1]], "FP32"), triton.InferInput("state", [2, 2, 128], "FP32")]
        both[0].set_data_from_numpy(steps[40:42])
        both[1].set_data_from_numpy(np.zeros((2, 2, 128), np.float32))
        answer = client.infer("vad", both)
        assert answer.as_numpy("stateN").shape == (2, 2, 128) and answer.as_numpy("output").shape == (2, 1)
        # A state with the wrong batch: one clear 400 naming the axis.
        wrong = [triton.InferInput("input", [1, steps.shape[1]], "FP32"), triton.InferInput("state", [2, 3, 128], "FP32")]
        wrong[0].set_data_from_numpy(steps[:1])
        wrong[1].set_data_from_numpy(np.zeros((2, 3, 128), np.float32))
        with pytest.raises(triton.InferenceServerException, match="axis 1"):
            client.infer("vad", wrong)
        assert running.stop() == 0


def test_rpi4_bundle_predicts_the_same_offline(bundles, speech, tmp_path):
    """The batch-file path (edgepack-agent predict) on the rpi4 bundle: independent streams, each one
    window from a zero state, equal the original's first step of each."""
    out, _ = bundles
    _, steps = speech
    np.savez(tmp_path / "in.npz", input=steps[:16], state=np.zeros((2, 16, 128), np.float32))
    done = run_cli("predict", "--bundle", out / "vad-1.0.0-rpi4.edgepack", "--input", tmp_path / "in.npz",
                   "--output", tmp_path / "out.npz", program="edgepack-agent")
    assert done.returncode == 0, done.stderr
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODELS / "silero_vad.onnx"), providers=["CPUExecutionProvider"])
    want = [session.run(None, {"input": w[None], "state": np.zeros((2, 1, 128), np.float32),
                               "sr": np.array(16000, np.int64)})[0][0, 0] for w in steps[:16]]
    with np.load(tmp_path / "out.npz") as got:
        np.testing.assert_allclose(got["output"][:, 0], want, atol=1e-4)


def test_converts_without_data_given_the_window_and_the_rate(tmp_path):
    done = run_cli("convert", MODELS / "silero_vad_16k_op15.onnx", "--profile", "x86-64", "--input-shape", "input=1,576",
                   "--constant", "sr=16000", "--out", tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)["profiles"]
    assert report["chosen"] == "onnx-fp32"
    with open_bundle(Path(report["bundle"])) as opened:
        assert opened.manifest["batch"]["constants"] == {"sr": 16000}


def test_mistakes_get_one_line_that_says_what_to_do(speech, tmp_path):
    folder, steps = speech
    # No window length: the random data cannot run; one line naming the options.
    done = run_cli("convert", MODELS / "silero_vad_16k_op15.onnx", "--profile", "x86-64", "--out", tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert "--input-shape" in line and "--constant" in line
    # Data without the constant: it names the input and the option.
    np.savez(tmp_path / "nosr.npz", input=steps[:8], state=np.zeros((2, 8, 128), np.float32))
    done = run_cli("convert", MODELS / "silero_vad.onnx", "--profile", "x86-64", "--calibration", tmp_path / "nosr.npz",
                   "--out", tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--constant sr=VALUE" in done.stderr, done.stderr
    # The state's samples on axis 0 (a user's mistake): the axis is named.
    np.savez(tmp_path / "axis0.npz", input=steps[:8], state=np.zeros((8, 2, 128), np.float32), sr=np.array(16000))
    done = run_cli("convert", MODELS / "silero_vad.onnx", "--profile", "x86-64", "--calibration", tmp_path / "axis0.npz",
                   "--out", tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--batch-axis state=AXIS" in done.stderr, done.stderr
    # An axis outside the input's rank.
    done = run_cli("convert", MODELS / "silero_vad.onnx", "--profile", "x86-64", "--batch-axis", "state=5", "--out", tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr and "rank 3" in done.stderr, done.stderr
    assert not list(tmp_path.glob("*.edgepack"))


def test_jsonl_batch_file_stacks_each_input_on_its_own_axis(bundles, speech, tmp_path):
    """JSONL: one stream per line, each line's state a [2, 128] (its axis 1 left out), the rate given on
    some lines and left to the bundle's default on others; the output lines split stateN on axis 1."""
    out, _ = bundles
    _, steps = speech
    with open(tmp_path / "in.jsonl", "w") as handle:
        for index, window in enumerate(steps[:6]):
            record = {"input": window.tolist(), "state": np.zeros((2, 128)).tolist()}
            if index % 2:
                record["sr"] = 16000
            handle.write(json.dumps(record) + "\n")
    done = run_cli("predict", "--bundle", out / "vad-1.0.0-x86-64.edgepack", "--input", tmp_path / "in.jsonl",
                   "--output", tmp_path / "out.jsonl", program="edgepack-agent")
    assert done.returncode == 0, done.stderr
    assert "scored 6 samples" in done.stdout, done.stdout
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODELS / "silero_vad.onnx"), providers=["CPUExecutionProvider"])
    assert len(rows) == 6
    for row, window in zip(rows, steps[:6]):
        probability, state = session.run(None, {"input": window[None], "state": np.zeros((2, 1, 128), np.float32),
                                                "sr": np.array(16000, np.int64)})
        np.testing.assert_allclose(row["output"], probability[0], atol=1e-4)
        np.testing.assert_allclose(np.asarray(row["stateN"]), state[:, 0], atol=1e-4)
    with open(tmp_path / "bad.jsonl", "w") as handle:
        handle.write(json.dumps({"input": steps[0].tolist(), "state": np.zeros((2, 128)).tolist(), "sr": 16000}) + "\n")
        handle.write(json.dumps({"input": steps[1].tolist(), "state": np.zeros((2, 128)).tolist(), "sr": 8000}) + "\n")
    done = run_cli("predict", "--bundle", out / "vad-1.0.0-x86-64.edgepack", "--input", tmp_path / "bad.jsonl",
                   "--output", tmp_path / "bad-out.jsonl", program="edgepack-agent")
    assert done.returncode != 0 and "constant" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
