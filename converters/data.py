"""Calibration and validation data: .npy, .npz or a folder of images with recorded preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepack.errors import DataError, InputFileError, UsageError
from edgepack.tensors import TensorSpec

#: Keys of an .npz that hold labels rather than a model input.
LABEL_KEYS = ("labels", "label", "y")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class Dataset:
    """Inputs by model input name (first axis = samples), optional labels, and how they were made."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    preprocessing: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, count: int) -> "Dataset":
        """The first ``count`` samples."""
        labels = None if self.labels is None else self.labels[:count]
        return Dataset({k: v[:count] for k, v in self.inputs.items()}, labels, self.source, self.preprocessing)


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a folder of images becomes a tensor; recorded in the bundle so the device does the same."""

    size: tuple[int, int] | None = None  # (height, width); default: from the model's input shape
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 255.0  # pixels are divided by this before mean/std
    layout: str = "nchw"
    color: str = "rgb"  # rgb or gray

    def to_dict(self) -> dict:
        return {"type": "image", "size": list(self.size) if self.size else None, "mean": list(self.mean),
                "std": list(self.std), "scale": self.scale, "layout": self.layout, "color": self.color}


def parse_floats(value: str | None, option: str) -> tuple[float, ...] | None:
    """``0.5,0.5,0.5`` to floats; a clear error naming the option otherwise."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"{option} {value!r} is malformed; use comma-separated numbers") from None


def load_dataset(path: str, inputs: list[TensorSpec], image: ImagePreprocessing | None = None) -> Dataset:
    """Load DATA for a model with ``inputs``; check names, ranks and fixed dimensions."""
    source = Path(path)
    if not source.exists():
        raise InputFileError(f"data {path} does not exist; check the path")
    if source.is_dir():
        dataset = _load_images(source, inputs, image or ImagePreprocessing())
    elif source.suffix.lower() == ".npy":
        dataset = _load_npy(source, inputs)
    elif source.suffix.lower() == ".npz":
        dataset = _load_npz(source, inputs)
    else:
        raise InputFileError(f"unknown data format {source.suffix!r} for {path}; use .npy, .npz or a folder of images")
    _check(dataset, inputs, path)
    return dataset


def _load_npy(path: Path, inputs: list[TensorSpec]) -> Dataset:
    if len(inputs) != 1:
        names = ", ".join(s.name for s in inputs)
        raise DataError(f"{path.name} holds one array but the model has {len(inputs)} inputs ({names}); use an .npz keyed by input name")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputFileError(f"{path.name} is not a readable .npy array ({exc})") from None
    return Dataset({inputs[0].name: array}, None, str(path))


def _load_npz(path: Path, inputs: list[TensorSpec]) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError) as exc:
        raise InputFileError(f"{path.name} is not a readable .npz archive ({exc})") from None
    labels = next((arrays.pop(k) for k in LABEL_KEYS if k in arrays), None)
    names = [spec.name for spec in inputs]
    if len(inputs) == 1 and len(arrays) == 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}  # one input, one array: the name does not matter
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"{path.name} lacks arrays for the inputs {missing}; it has {sorted(arrays)} (labels go under 'labels')")
    return Dataset({n: arrays[n] for n in names}, labels, str(path))


def _load_images(folder: Path, inputs: list[TensorSpec], prep: ImagePreprocessing) -> Dataset:
    from PIL import Image

    if len(inputs) != 1:
        raise DataError("an image folder can only feed a model with one input")
    spec = inputs[0]
    layout = prep.layout.lower()
    if layout not in ("nchw", "nhwc") or len(spec.shape) != 4:
        raise DataError(f"image data needs a 4-D input (nchw or nhwc), the model takes {spec.describe()}")
    size = prep.size
    if size is None:
        dims = spec.shape[2:4] if layout == "nchw" else spec.shape[1:3]
        if None in dims:
            raise UsageError("the model's image size is dynamic; give --resize H,W")
        size = tuple(dims)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    classes = sorted({p.parent.name for p in files}) if all(p.parent != folder for p in files) else None
    mean, std = np.asarray(prep.mean, np.float32), np.asarray(prep.std, np.float32)
    tensors = []
    for file in files:
        try:
            with Image.open(file) as img:
                img = img.convert("L" if prep.color == "gray" else "RGB").resize((size[1], size[0]), Image.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32)
        except OSError as exc:
            raise DataError(f"cannot read image {file}: {exc}") from None
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        pixels = (pixels / prep.scale - mean) / std
        tensors.append(pixels.transpose(2, 0, 1) if layout == "nchw" else pixels)
    labels = np.asarray([classes.index(p.parent.name) for p in files]) if classes else None
    record = ImagePreprocessing(tuple(size), prep.mean, prep.std, prep.scale, layout, prep.color).to_dict()
    if classes:
        record["classes"] = classes
    return Dataset({spec.name: np.stack(tensors).astype(np.float32)}, labels, str(folder), record)


def _check(dataset: Dataset, inputs: list[TensorSpec], path: str) -> None:
    counts = set()
    for spec in inputs:
        array = dataset.inputs[spec.name]
        if array.dtype.kind not in "fiub":
            raise DataError(f"{path}: input {spec.name!r} has dtype {array.dtype}; the model needs {spec.dtype}")
        problem = spec.check(array) if not spec.shape or spec.shape[0] is None else _check_fixed_batch(spec, array)
        if problem:
            raise DataError(f"{path}: {problem}")
        dataset.inputs[spec.name] = array.astype(spec.dtype, copy=False)
        counts.add(len(array))
    if len(counts) != 1:
        raise DataError(f"{path}: inputs hold different numbers of samples {sorted(counts)}")
    if dataset.labels is not None and len(dataset.labels) != counts.pop():
        raise DataError(f"{path}: 'labels' holds {len(dataset.labels)} entries but the inputs hold another number of samples")


def _check_fixed_batch(spec: TensorSpec, array: np.ndarray) -> str | None:
    # A model exported with a fixed batch of B still takes N samples, run B at a time.
    relaxed = TensorSpec(spec.name, spec.dtype, (None,) + tuple(spec.shape[1:]))
    return relaxed.check(array)


def random_dataset(inputs: list[TensorSpec], count: int = 32, seed: int = 0) -> Dataset:
    """Synthetic standard-normal inputs, for checking float recipes when no data is given."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in inputs:
        shape = tuple(d if d is not None else 1 for d in spec.shape)
        shape = (count,) + shape[1:] if shape else (count,)
        arrays[spec.name] = (rng.standard_normal(shape).astype(spec.dtype) if np.dtype(spec.dtype).kind == "f"
                             else rng.integers(0, 10, shape).astype(spec.dtype))
    return Dataset(arrays, None, "random (no data given)")
