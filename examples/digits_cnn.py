"""A small CNN trained for a few seconds on scikit-learn's digits (8x8 images, 10 classes).

Writes, into the folder given (default: examples/out):
    digits_cnn.pt2          the trained network, saved with torch.export
    calibration.npz         300 training images, input name 'input', for quantization
    validation.npz          the held-out test images with their 'labels'
    test_inputs.npy         20 held-out images to score on the agent

    python examples/digits_cnn.py [OUT]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def build_model():
    """A compact CNN: two conv blocks and a linear classifier (about 12k parameters)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    )


def load_digits_data(seed: int = 0):
    """Digits scaled to [0, 1] as float32 NCHW, split 75/25."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return train_test_split(images, digits.target.astype(np.int64), test_size=0.25, random_state=seed, stratify=digits.target)


def train(epochs: int = 15, seed: int = 0):
    """Train the CNN (a few seconds on a CPU); return (model, data splits, test accuracy)."""
    import torch

    torch.manual_seed(seed)
    x_train, x_test, y_train, y_test = load_digits_data(seed)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(epochs):
        model.train()
        permutation = torch.randperm(len(xt))
        for start in range(0, len(xt), 64):
            index = permutation[start : start + 64]
            optimizer.zero_grad()
            loss_fn(model(xt[index]), yt[index]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    return model, (x_train, x_test, y_train, y_test), accuracy


def main(out: Path) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model, (x_train, x_test, y_train, y_test), accuracy = train()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.from_numpy(x_test[:2]),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(out / "digits_cnn.pt2"))
    np.savez(out / "calibration.npz", input=x_train[:300])
    np.savez(out / "validation.npz", input=x_test, labels=y_test)
    np.save(out / "test_inputs.npy", x_test[:20])
    print(f"trained digits CNN: test accuracy {accuracy:.2%}; wrote {out}")


if __name__ == "__main__":
    import argparse

    # argparse, not sys.argv[1]: "digits_cnn.py --out DIR" once wrote into a folder named "--out".
    parser = argparse.ArgumentParser(description="Train the example digits CNN and write it with its data files.")
    parser.add_argument("out", nargs="?", type=Path, default=Path(__file__).parent / "out", help="output folder")
    main(parser.parse_args().out)
