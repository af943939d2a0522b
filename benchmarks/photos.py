"""Real photos as model input: the photographs scikit-image and scikit-learn ship, cut into crops.

Nothing can be downloaded here, so the photos are the ones the two packages bundle (an astronaut, a cat,
coffee, a rocket, a Chinese temple, a flower, a camera man, coins, the moon, ...). Calibration and
validation crops come from *different* photos, so the gate judges a model on pictures its calibration
never saw.
"""

from __future__ import annotations

import numpy as np

#: colour photographs (grey ones are repeated into three channels)
CALIBRATION_PHOTOS = ("astronaut", "china", "camera", "coins", "brick", "gravel", "moon", "hubble_deep_field")
#: more subjects an ImageNet model knows (a cat, coffee, a rocket, a flower, a clock), and some it does not
VALIDATION_PHOTOS = ("chelsea", "coffee", "rocket", "flower", "clock", "immunohistochemistry", "grass", "retina")

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def load_photo(name: str) -> np.ndarray:
    """One bundled photo as uint8 HxWx3."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3]).astype(np.uint8)


def crops(photos: tuple[str, ...], count: int, size: int = 224, seed: int = 0, mean=IMAGENET_MEAN,
          std=IMAGENET_STD, layout: str = "nchw") -> np.ndarray:
    """``count`` random crops (40-100% of the shorter side, random flips) resized to ``size``,
    normalised as ImageNet models expect, float32 NCHW (or NHWC)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [load_photo(name) for name in photos]
    out = np.empty((count, size, size, 3), dtype=np.float32)
    for index in range(count):
        image = images[index % len(images)]
        height, width = image.shape[:2]
        side = int(min(height, width) * rng.uniform(0.4, 1.0))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = Image.fromarray(image[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
        pixels = np.asarray(crop, dtype=np.float32) / 255.0
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        out[index] = (pixels - mean) / std
    return out.transpose(0, 3, 1, 2).copy() if layout == "nchw" else out


def calibration_and_validation(calibration: int = 64, validation: int = 200, size: int = 224, **kw):
    """Calibration crops and held-out validation crops from different photos."""
    return (crops(CALIBRATION_PHOTOS, calibration, size, seed=1, **kw),
            crops(VALIDATION_PHOTOS, validation, size, seed=2, **kw))
