"""Small real models the tests build and train (no downloads)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def wide_mlp() -> nn.Module:
    """An MLP whose weights dominate its size (for the ~4x int8 size check); 64 features, 10 classes."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()


def rollout_mlp() -> nn.Module:
    """A ~2 MB fp32 MLP (64 features, 10 classes): the bundle benchmarks/rollout.py sends to a fleet."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 448), nn.ReLU(), nn.Linear(448, 10)).eval()


class HugeRange(nn.Module):
    """A deliberately unquantizable network.

    One hidden unit carries values around 1e4 while the class information lives in small values of
    the other units. int8 activations share one scale per tensor, so the huge unit sets a step far
    larger than the small values and they quantize to zero; kept in float, the next layer is exact.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.first = nn.Linear(64, 32)
        self.second = nn.Linear(32, 10)
        with torch.no_grad():
            self.first.weight[0].zero_()
            self.first.bias[0] = 1e4  # the huge-range unit
            self.second.weight[:, 0] = 1e-5  # it barely matters to the output

    def forward(self, x):
        return self.second(self.first(x))


def huge_range() -> nn.Module:
    return HugeRange().eval()


class HugeRangeDeep(nn.Module):
    """``HugeRange`` behind a well-behaved layer: full int8 fails on the huge-range tensor, and keeping
    the layers around it float still leaves the first layer int8 (what a mixed recipe should find)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.features = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        self.tail = HugeRange()

    def forward(self, x):
        return self.tail(self.features(x))


def huge_range_deep() -> nn.Module:
    return HugeRangeDeep().eval()


def digits_features(count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as float32 [N, 64] in [0, 1] with labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    return (features[:count], digits.target[:count]) if count else (features, digits.target)


class Determinant(nn.Module):
    """A network ending in a matrix determinant: ONNX has ``Det``, litert-torch has no lowering for it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.project = nn.Linear(64, 16)

    def forward(self, x):
        return torch.linalg.det(self.project(x).view(-1, 4, 4)).unsqueeze(1)


def determinant() -> nn.Module:
    return Determinant().eval()


class BakedBatchCNN(nn.Module):
    """A small ViT-style network: a learned class token expanded to the batch and concatenated with the
    patch tokens. Traced at batch 1 the expand is baked to batch 1, so its batch cannot be made dynamic."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.patches = nn.Conv2d(1, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(tokens.mean(1))


def baked_batch_cnn() -> nn.Module:
    return BakedBatchCNN().eval()


class DepthwiseCNN(nn.Module):
    """A MobileNet-style block (depthwise-separable convolution, ReLU6) with a clean ``flatten(1)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 32, 1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def depthwise_cnn() -> nn.Module:
    return DepthwiseCNN().eval()


class BatchOneViT(BakedBatchCNN):
    """``BakedBatchCNN`` written for batch 1 only (the class token is concatenated as it is): a trace
    keeps it that way, so the converter has to keep the batch fixed at 1."""

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        return self.head(torch.cat([self.cls, tokens], dim=1).mean(1))


def batch_one_vit() -> nn.Module:
    return BatchOneViT().eval()


class DigitsThree(nn.Module):
    """Takes what the digits CNN takes ([N, 1, 8, 8]) but answers 3 scores under another output name:
    a second version whose output specs differ from the first (version-pinning tests)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))

    def forward(self, x):
        return {"three": self.body(x)}


def digits_three() -> nn.Module:
    return DigitsThree().eval()


class _Fleet(nn.Module):
    """The small model of the fleet-update tests: 8 features in, 4 scores out; ``mode`` makes it bad."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.mode = mode
        self.first = nn.Linear(8, 16)
        self.last = nn.Linear(16, 4)
        # "slow": the same answer after one large layer applied 40 times that adds nothing (1e-9 weight on
        # its output): ~40 M multiply-adds per sample for a 4 MB model.
        self.burden = nn.Linear(1024, 1024) if mode == "slow" else None

    def forward(self, x):
        hidden = torch.relu(self.first(x))
        if self.mode == "nan":
            # log of the input: fine for the positive calibration data, NaN for negative live inputs
            hidden = hidden + 0.0 * torch.log(x).sum(dim=1, keepdim=True)
        if self.burden is not None:
            wide = x.repeat(1, 128)
            for _ in range(40):
                wide = torch.relu(self.burden(wide)) * 0.5
            hidden = hidden + 1e-9 * wide[:, :16]
        return self.last(hidden)


def fleet_good() -> nn.Module:
    return _Fleet("good").eval()


def fleet_nan() -> nn.Module:
    return _Fleet("nan").eval()


def fleet_slow() -> nn.Module:
    return _Fleet("slow").eval()


def fleet_large() -> nn.Module:
    """The fleet model with a ~5 MB weight matrix (for benchmarks/update.py)."""
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(8, 1280), nn.ReLU(), nn.Linear(1280, 1000), nn.ReLU(), nn.Linear(1000, 4)).eval()


class WideActivations(nn.Module):
    """Three 32-channel 3x3 convolutions at full resolution: activations ~40x the input, the shape of a
    segmentation or detection backbone (for the converter's memory tests)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1), nn.Sigmoid())

    def forward(self, x):
        return self.features(x)


def wide_activations() -> nn.Module:
    return WideActivations().eval()
