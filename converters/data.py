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
    """Inputs by model input name, optional labels, and how they were made.

    Samples lie on each input's ``axes`` entry (absent: axis 0); an input whose axis is None is a
    constant, given whole to every run."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    preprocessing: dict = field(default_factory=dict)
    axes: dict[str, int | None] = field(default_factory=dict)

    def axis(self, name: str) -> int | None:
        axis = self.axes.get(name, 0)
        return axis if axis is not None and axis < np.ndim(self.inputs[name]) else None

    def __len__(self) -> int:
        for name, array in self.inputs.items():
            axis = self.axis(name)
            if axis is not None:
                return int(array.shape[axis])
        return 1

    def slice(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Feeds holding samples ``start`` to ``stop`` (constants whole)."""
        feeds = {}
        for name, array in self.inputs.items():
            axis = self.axis(name)
            if axis is None:
                feeds[name] = array
            else:
                index = [slice(None)] * array.ndim
                index[axis] = slice(start, stop)
                feeds[name] = array[tuple(index)]
        return feeds

    def steps(self) -> list[dict[str, np.ndarray]]:
        """One feed per sample, in order: the steps of a sequence for a stateful model."""
        return [self.slice(index, index + 1) for index in range(len(self))]

    def take(self, count: int) -> "Dataset":
        """The first ``count`` samples."""
        labels = None if self.labels is None else self.labels[:count]
        return Dataset(self.slice(0, count), labels, self.source, self.preprocessing, dict(self.axes))


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


def load_dataset(path: str, inputs: list[TensorSpec], image: ImagePreprocessing | None = None,
                 constants: dict | None = None) -> Dataset:
    """Load DATA for a model with ``inputs``; check names, ranks and fixed dimensions, each input's
    samples on its own axis. ``constants`` (``--constant``) fill constant inputs the data lacks and
    override the ones it holds."""
    source = Path(path)
    if not source.exists():
        raise InputFileError(f"data {path} does not exist; check the path")
    if source.is_dir():
        dataset = _load_images(source, inputs, image or ImagePreprocessing())
    elif source.suffix.lower() == ".npy":
        dataset = _load_npy(source, inputs)
    elif source.suffix.lower() == ".npz":
        dataset = _load_npz(source, inputs, set(constants or ()))
    else:
        raise InputFileError(f"unknown data format {source.suffix!r} for {path}; use .npy, .npz or a folder of images")
    dataset.axes = {spec.name: spec.sample_axis for spec in inputs}
    for spec in inputs:
        if spec.name in (constants or {}):
            dataset.inputs[spec.name] = constant_array(spec, constants[spec.name])
    # In the model's input order: a torch model takes its inputs by position.
    dataset.inputs = {spec.name: dataset.inputs[spec.name] for spec in inputs if spec.name in dataset.inputs}
    _check(dataset, inputs, path)
    return dataset


def _load_npy(path: Path, inputs: list[TensorSpec]) -> Dataset:
    if len([spec for spec in inputs if spec.sample_axis is not None]) != 1:
        names = ", ".join(s.name for s in inputs)
        raise DataError(f"{path.name} holds one array but the model has {len(inputs)} inputs ({names}); use an .npz keyed by input name")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputFileError(f"{path.name} is not a readable .npy array ({exc})") from None
    batched = next(spec for spec in inputs if spec.sample_axis is not None)
    return Dataset({batched.name: array}, None, str(path))


def _load_npz(path: Path, inputs: list[TensorSpec], given: set = frozenset()) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError) as exc:
        raise InputFileError(f"{path.name} is not a readable .npz archive ({exc})") from None
    labels = next((arrays.pop(k) for k in LABEL_KEYS if k in arrays), None)
    names = [spec.name for spec in inputs]
    if len(inputs) == 1 and len(arrays) == 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}  # one input, one array: the name does not matter
    missing = [n for n in names if n not in arrays and n not in given]
    if missing:
        constants = [spec.name for spec in inputs if spec.name in missing and spec.sample_axis is None]
        hint = f" (a constant such as {constants[0]!r} can be given with --constant {constants[0]}=VALUE)" if constants else ""
        raise DataError(f"{path.name} lacks arrays for the inputs {missing}; it has {sorted(arrays)} (labels go under "
                        f"'labels'){hint}")
    return Dataset({n: arrays[n] for n in names if n in arrays}, labels, str(path))


def _load_images(folder: Path, inputs: list[TensorSpec], prep: ImagePreprocessing) -> Dataset:
    from PIL import Image

    batched = [spec for spec in inputs if spec.sample_axis is not None]
    if len(batched) != 1 or batched[0].sample_axis != 0:
        raise DataError("an image folder can only feed a model with one input (give an .npz keyed by input name)")
    spec = batched[0]
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
    counts = {}
    for spec in inputs:
        if spec.name not in dataset.inputs:
            raise DataError(f"{path}: no data for input {spec.name!r} ({spec.describe()}); give it with --constant "
                            f"{spec.name}=VALUE or in an .npz")
        array = np.asarray(dataset.inputs[spec.name])
        if array.dtype.kind not in "fiub":
            raise DataError(f"{path}: input {spec.name!r} has dtype {array.dtype}; the model needs {spec.dtype}")
        if spec.sample_axis is None:
            problem = spec.check(array)
            if problem:
                raise DataError(f"{path}: {problem} (it is a constant: one value for every sample; give --batch-axis "
                                f"{spec.name}=AXIS if it holds samples)")
        else:
            problem = spec.served().check(array)
            if problem:
                where = f" with samples on axis {spec.sample_axis}" if spec.sample_axis else ""
                raise DataError(f"{path}: {problem}{where} (give --batch-axis {spec.name}=AXIS if its samples lie on another axis)")
            counts[spec.name] = spec.count(array)
        dataset.inputs[spec.name] = array.astype(spec.dtype, copy=False)
    if len(set(counts.values())) > 1:
        held = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise DataError(f"{path}: inputs hold different numbers of samples ({held}); each input's samples lie on its batch "
                        "axis (--batch-axis NAME=AXIS says which)")
    count = next(iter(counts.values()), 1)
    if dataset.labels is not None and len(dataset.labels) != count:
        raise DataError(f"{path}: 'labels' holds {len(dataset.labels)} entries but the inputs hold another number of samples")


def constant_array(spec: TensorSpec, value, shape: tuple | None = None) -> np.ndarray:
    """``--constant`` VALUE as the input takes it (a scalar fills a fixed shape); UsageError when it
    does not fit."""
    array = np.asarray(value, dtype=spec.dtype)
    target = shape if shape is not None else tuple(d if d is not None else array.size for d in spec.shape)
    try:
        return np.broadcast_to(array.reshape(target) if array.size == int(np.prod(target)) else array, target).copy()
    except ValueError:
        raise UsageError(f"--constant {spec.name}: {array.size} value(s) do not fit the input {spec.describe()}; give "
                         f"one value or {int(np.prod(target))}") from None


def random_dataset(inputs: list[TensorSpec], count: int = 32, seed: int = 0, constants: dict | None = None,
                   shapes: dict | None = None, zeros: tuple = ()) -> Dataset:
    """Synthetic standard-normal inputs, for checking float recipes when no data is given: ``count``
    samples on each input's own axis, ``shapes`` (``--input-shape``) for dynamic dimensions, constants
    from ``constants`` (else zero), and zeros for the inputs named in ``zeros`` (a recurrent state)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in inputs:
        given = (shapes or {}).get(spec.name)
        shape = [g if d is None and given else (d if d is not None else 1)
                 for d, g in zip(spec.shape, given or [None] * len(spec.shape))]
        if spec.sample_axis is None:
            arrays[spec.name] = constant_array(spec, (constants or {}).get(spec.name, 0), tuple(shape))
            continue
        shape[spec.sample_axis] = count
        if spec.name in zeros:
            arrays[spec.name] = np.zeros(shape, spec.dtype)
        elif np.dtype(spec.dtype).kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            arrays[spec.name] = rng.integers(0, 10, shape).astype(spec.dtype)
    return Dataset(arrays, None, "random (no data given)", axes={spec.name: spec.sample_axis for spec in inputs})
