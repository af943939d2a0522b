"""On-device drift on real data: false alarms on normal traffic, detection of real shifts, and the cost
per request, against the PSI rule of the previous release.

    python benchmarks/drift.py [--windows 50] [--shift-windows 20] [--window 100] [--models lite0,minilm,tabular]

The reference is built by the converter's own function (``converters.stats.dataset_stats``) from the
validation data and the original model's outputs on it; live traffic goes through ``DriftMonitor`` as
the agent's scheduler feeds it. Per model:

- **EfficientNet-Lite0** (ImageNet weights), 50 validation crops of real photos as the reference (the
  issue's setting); normal traffic is fresh crops of the same photos. Shifts: under-exposure (pixels
  x0.4), blur (5x5 box), sensor noise (sigma 0.1 of the pixel range), another photo domain (crops of
  the other bundled photos).
- **all-MiniLM-L6-v2**, 200 validation sentences (Python documentation); normal traffic is held-out
  sentences of the same pool. Shift: sentences of another domain (licence texts).
- **Logistic regression** on scikit-learn's breast-cancer table, 150 validation rows; normal traffic is
  held-out rows. Shifts: one feature off by one standard deviation (a miscalibrated sensor), every
  feature scaled by 1.1 (a gain error).

A window is ``--window`` samples (the agent's ``drift_window``); each window is a fresh random draw of
normal or shifted traffic. "first alarm" is the number of one-sample requests after a window of normal
traffic until the monitor alarms (median over the shifted windows' first samples; more than a
window: never). The PSI baseline is what the agent did before: an alarm when the input histogram's PSI or
the predicted-class PSI exceeds 0.25 on at least 100 samples.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from overload import cpu_flags  # noqa: E402

from agent.drift import DriftMonitor  # noqa: E402
from agent.drift.psi import HistogramScore, psi  # noqa: E402
from converters.stats import dataset_stats  # noqa: E402


def median_us(fn, repeats: int = 200) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


class Case:
    """One model: its reference, and a way to make windows of normal and shifted traffic."""

    def __init__(self, label, reference, input_names, output_names, normal, shifts, run_one, sample_one):
        self.label, self.reference, self.inputs, self.outputs = label, reference, input_names, output_names
        self.normal, self.shifts, self.run_one, self.sample_one = normal, shifts, run_one, sample_one


def psi_alarm(reference: dict, feeds: dict, outputs: dict) -> bool:
    """The previous release's rule on one window."""
    for name, stats in reference["inputs"].items():
        score = HistogramScore.of(stats, 10**9)
        counts = score.counts(feeds[name]) if score else None
        if counts is not None and len(feeds[name]) >= 100 and score.psi(counts[0]) > 0.25:
            return True
    for name, stats in (reference.get("outputs") or {}).items():
        classes = stats.get("classes")
        if classes and len(outputs[name]) >= 100:
            live = np.bincount(np.asarray(outputs[name]).argmax(axis=1), minlength=len(classes["frequency"]))
            if psi(classes["frequency"], live) > 0.25:
                return True
    return False


def window_verdict(case: Case, feeds: dict, outputs: dict, window: int) -> tuple[bool, set[str]]:
    monitor = DriftMonitor(case.reference, case.inputs, case.outputs, window)
    monitor.observe(feeds, outputs)
    fired = {label for label, test in monitor.scores()["tests"].items() if test and test["alarm"]}
    return bool(fired), fired


def requests_to_alarm(case: Case, normal: tuple, shifted: tuple, window: int) -> int | None:
    monitor = DriftMonitor(case.reference, case.inputs, case.outputs, window)
    monitor.observe(*normal)
    feeds, outputs = shifted
    for index in range(len(next(iter(feeds.values())))):
        monitor.observe({k: v[index:index + 1] for k, v in feeds.items()}, {k: v[index:index + 1] for k, v in outputs.items()})
        if any(test and test["alarm"] for test in monitor.scores()["tests"].values()):
            return index + 1
    return None


def evaluate(case: Case, windows: int, shift_windows: int, window: int) -> list[dict]:
    rows = []
    normal_windows = [case.normal(window, seed) for seed in range(windows)]
    verdicts = [window_verdict(case, *w, window) for w in normal_windows]
    rows.append({"traffic": "normal (false alarms)", "windows": windows, "alarms": sum(v for v, _ in verdicts),
                 "psi": sum(psi_alarm(case.reference, *w) for w in normal_windows), "first": None,
                 "fired": sorted(set().union(*(f for _, f in verdicts)))})
    for name, make in case.shifts.items():
        shifted = [make(window, 1000 + seed) for seed in range(shift_windows)]
        verdicts = [window_verdict(case, *w, window) for w in shifted]
        firsts = [requests_to_alarm(case, normal_windows[i % windows], shifted[i], window) for i in range(min(5, shift_windows))]
        rows.append({"traffic": name, "windows": shift_windows, "alarms": sum(v for v, _ in verdicts),
                     "psi": sum(psi_alarm(case.reference, *w) for w in shifted),
                     "first": statistics.median([f if f is not None else window + 1 for f in firsts]),
                     "fired": sorted(set().union(*(f for _, f in verdicts)))})
    return rows


# -- the models --------------------------------------------------------------------------------------

def lite0_case(work: Path, validation_count: int = 50) -> Case:
    import onnxruntime as ort
    import torch

    from photos import CALIBRATION_PHOTOS, VALIDATION_PHOTOS, crops
    from pretrained import LITE_MEAN, LITE_STD, efficientnet_lite

    model = efficientnet_lite("lite0")
    path = work / "lite0.onnx"
    example = torch.zeros(1, 3, 224, 224)
    torch.onnx.export(model, example, str(path), input_names=["inputs"], output_names=["logits"],
                      dynamic_axes={"inputs": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    single = ort.SessionOptions()
    single.intra_op_num_threads = 1
    one = ort.InferenceSession(str(path), single, providers=["CPUExecutionProvider"])

    def run(images):
        return np.concatenate([session.run(None, {"inputs": images[i:i + 32]})[0] for i in range(0, len(images), 32)])

    def pixels(images):
        return images * LITE_STD[None, :, None, None] + LITE_MEAN[None, :, None, None]

    def normalised(values):
        return ((np.clip(values, 0, 1) - LITE_MEAN[None, :, None, None]) / LITE_STD[None, :, None, None]).astype(np.float32)

    def box_blur(values):
        padded = np.pad(values, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")
        rows = sum(padded[:, :, i:i + values.shape[2], :] for i in range(5)) / 5
        return sum(rows[:, :, :, i:i + values.shape[3]] for i in range(5)) / 5

    def window(photos, transform=None):
        def make(count, seed):
            images = crops(photos, count, seed=seed + 10, mean=LITE_MEAN, std=LITE_STD)
            if transform is not None:
                images = normalised(transform(pixels(images), np.random.default_rng(seed)))
            return {"inputs": images}, {"logits": run(images)}
        return make

    validation = crops(VALIDATION_PHOTOS, validation_count, seed=2, mean=LITE_MEAN, std=LITE_STD)
    calibration = crops(CALIBRATION_PHOTOS, 32, seed=1, mean=LITE_MEAN, std=LITE_STD)
    reference = dataset_stats({"inputs": calibration}, "crops", {"logits": run(validation)}, {"inputs": validation},
                              {"logits": "classes"})
    shifts = {"under-exposure (x0.4)": window(VALIDATION_PHOTOS, lambda p, rng: p * 0.4),
              "blur (5x5 box)": window(VALIDATION_PHOTOS, lambda p, rng: box_blur(p)),
              "sensor noise (sigma 0.1)": window(VALIDATION_PHOTOS, lambda p, rng: p + rng.normal(0, 0.1, p.shape)),
              "other photos": window(CALIBRATION_PHOTOS)}
    sample = {"inputs": validation[:1]}
    return Case("EfficientNet-Lite0 (3x224x224, 1000 classes)", reference, ["inputs"], ["logits"],
                window(VALIDATION_PHOTOS), shifts, lambda: one.run(None, sample), (sample, {"logits": run(validation[:1])}))


def minilm_case(work: Path, validation_count: int = 200) -> Case:
    import torch

    from pretrained import SEQUENCE, sentence_encoder
    from sentences import licence_sentences, sentences

    model, tokenizer = sentence_encoder()
    pool = sentences(2900)
    np.random.default_rng(0).shuffle(pool)  # the pool is ordered by source module: mix it

    def encode(texts):
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=SEQUENCE, return_tensors="np")
        ids, mask = tokens["input_ids"].astype(np.int64), tokens["attention_mask"].astype(np.int64)
        with torch.no_grad():
            embeddings = np.concatenate([model(torch.from_numpy(ids[i:i + 64]), torch.from_numpy(mask[i:i + 64])).numpy()
                                         for i in range(0, len(ids), 64)])
        return {"input_ids": ids, "attention_mask": mask}, {"embedding": embeddings}

    validation, held_out = encode(pool[:validation_count]), encode(pool[validation_count:])
    other = encode(licence_sentences(600))

    def draw(source):
        def make(count, seed):
            chosen = np.random.default_rng(seed).choice(len(source[1]["embedding"]), count, replace=False)
            return ({k: v[chosen] for k, v in source[0].items()}, {k: v[chosen] for k, v in source[1].items()})
        return make

    reference = dataset_stats(validation[0], "sentences", validation[1], validation[0], {"embedding": "embedding"})
    sample = {k: v[:1] for k, v in validation[0].items()}
    feeds = {k: torch.from_numpy(v) for k, v in sample.items()}

    def run_one():
        with torch.no_grad():
            model(feeds["input_ids"], feeds["attention_mask"])
    return Case("all-MiniLM-L6-v2 (2x64 tokens, 384-d embedding)", reference, ["input_ids", "attention_mask"], ["embedding"],
                draw(held_out), {"licence texts (another domain)": draw(other)}, run_one,
                (sample, {k: v[:1] for k, v in validation[1].items()}))


def tabular_case(work: Path) -> Case:
    import onnxruntime as ort
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    order = np.random.default_rng(0).permutation(len(data.data))
    rows = data.data[order].astype(np.float32)
    train, validation, held_out = rows[:200], rows[200:350], rows[350:]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(train, data.target[order][:200])
    onnx_model = to_onnx(model, train[:1], options={id(model.steps[-1][1]): {"zipmap": False}})
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    spread = validation.std(axis=0)

    def draw(transform=None):
        def make(count, seed):
            rng = np.random.default_rng(seed)
            chosen = held_out[rng.choice(len(held_out), count, replace=count > len(held_out))]
            if transform is not None:
                chosen = transform(chosen.copy()).astype(np.float32)
            return {input_name: chosen}, {"probabilities": model.predict_proba(chosen).astype(np.float32)}
        return make

    def offset(values):
        values[:, 0] += spread[0]
        return values

    reference = dataset_stats({input_name: train}, "rows", {"probabilities": model.predict_proba(validation)},
                              {input_name: validation}, {"probabilities": "classes"})
    sample = {input_name: validation[:1]}
    return Case("logistic regression (breast cancer, 30 features)", reference, [input_name], ["probabilities"], draw(),
                {"feature 0 off by 1 std": draw(offset), "all features x1.1": draw(lambda v: v * 1.1)},
                lambda: session.run(None, sample), (sample, {"probabilities": model.predict_proba(validation[:1])}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=50, help="windows of normal traffic")
    parser.add_argument("--shift-windows", type=int, default=20, help="windows of each shift")
    parser.add_argument("--window", type=int, default=100, help="samples per window (drift_window)")
    parser.add_argument("--models", default="lite0,minilm,tabular")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgepack-drift-bench-"))
    makers = {"lite0": lite0_case, "minilm": minilm_case, "tabular": tabular_case}
    results, costs = [], []
    for name in args.models.split(","):
        started = time.perf_counter()
        case = makers[name](work)
        for row in evaluate(case, args.windows, args.shift_windows, args.window):
            results.append((case.label, row))
        monitor = DriftMonitor(case.reference, case.inputs, case.outputs, args.window)
        feeds, outputs = case.sample_one
        costs.append((case.label, median_us(case.run_one, 50), median_us(lambda: monitor.observe(feeds, outputs), 500),
                      median_us(monitor.scores, 50)))
        print(f"{case.label}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(f"CPU: {cpu_flags()}")
    print(f"\nwindow {args.window} samples; false-alarm rate set to 1% per window (all of a model's scores)\n")
    print("| model | traffic | windows | alarming (tests) | alarming (PSI rule, before) | first alarm after (requests) | scores that fired |")
    print("|---|---|---|---|---|---|---|")
    for label, row in results:
        first = "—" if row["first"] is None else (f"{row['first']:.0f}" if row["first"] <= args.window else "never")
        print(f"| {label} | {row['traffic']} | {row['windows']} | {row['alarms'] / row['windows']:.0%} | "
              f"{row['psi'] / row['windows']:.0%} | {first} | {', '.join(row['fired']) or '—'} |")
    print("\n| model (1 sample per request) | model run p50 (µs) | drift observe p50 (µs) | observe / run | scores() p50 (µs, per check) |")
    print("|---|---|---|---|---|")
    for label, run_us, drift_us, scores_us in costs:
        print(f"| {label} | {run_us:.0f} | {drift_us:.0f} | {drift_us / run_us:.1%} | {scores_us:.0f} |")


if __name__ == "__main__":
    main()
