"""A MobileNetV2-style CNN (inverted residuals, depthwise 3x3 convolutions, ReLU6, squeeze-excite)
trained briefly on scikit-learn's digits upscaled to RGB images, so its activations are realistic.

Used by the benchmarks; built here because nothing can be downloaded from a model hub.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1), nn.ReLU(),
                                nn.Conv2d(channels // reduction, channels, 1), nn.Hardsigmoid())

    def forward(self, x):
        return x * self.fc(self.pool(x))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        if se:
            layers.append(SqueezeExcite(hidden))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


def mobilenet(classes: int = 10, width: float = 1.0) -> nn.Module:
    """MobileNetV2 layout (t, c, n, s), squeeze-excite in the later stages as in MobileNetV3."""
    def ch(c):
        return max(8, int(c * width + 4) // 8 * 8)

    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers = [nn.Conv2d(3, ch(32), 3, 2, 1, bias=False), nn.BatchNorm2d(ch(32)), nn.ReLU6()]
    cin = ch(32)
    for stage, (t, c, n, s) in enumerate(settings):
        for i in range(n):
            layers.append(InvertedResidual(cin, ch(c), s if i == 0 else 1, t, se=stage >= 4))
            cin = ch(c)
    layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Dropout(0.2), nn.Linear(1280, classes)]
    return nn.Sequential(*layers)


def digits_images(size: int = 96):
    """Digits as RGB images of size x size in [0, 1] (nearest upscaling, a colour tint per channel)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float()[:, None]
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    tint = torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)
    images = (images * tint - 0.45) / 0.25
    return images.numpy().astype(np.float32), digits.target


def trained_mobilenet(size: int = 96, epochs: int = 1, seed: int = 0):
    """Train for ``epochs`` on the digits; return (model, images, labels)."""
    torch.manual_seed(seed)
    images, labels = digits_images(size)
    model = mobilenet()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = torch.from_numpy(images[:1400]), torch.from_numpy(labels[:1400])
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            index = order[start : start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    return model.eval(), images, labels


def export_trained(folder, size: int = 96, epochs: int = 1):
    """Train, report held-out accuracy, and write mobilenet.pt2 (dynamic batch), calibration.npz and
    validation.npz (with labels) into ``folder``; return (images, labels)."""
    import time
    from pathlib import Path

    folder = Path(folder)
    start = time.time()
    model, images, labels = trained_mobilenet(size, epochs)
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(images[1400:])).argmax(1).numpy() == labels[1400:]).mean())
    print(f"MobileNet-style CNN, input 1x3x{size}x{size}, trained {time.time() - start:.0f} s, "
          f"held-out accuracy {accuracy:.2%}")
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.from_numpy(images[:2]),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "mobilenet.pt2"))
    np.savez(folder / "calibration.npz", input=images[:256])
    np.savez(folder / "validation.npz", input=images[1400:], labels=labels[1400:])
    return images, labels
