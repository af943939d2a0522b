"""Photos of text for the detector tests and benchmarks: scikit-image's bundled ``text`` and ``page``
photos (and ``coffee``, a scene without text), cut, scaled and flipped into distinct square crops with
PP-OCR's normalisation."""

from __future__ import annotations

import numpy as np

MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def text_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """``count`` distinct crops of scikit-image's photos of text, [count, 3, size, size], normalised."""
    from PIL import Image
    from skimage import data

    sources = [np.stack([data.text()] * 3, axis=-1), np.stack([data.page()] * 3, axis=-1), data.coffee()]
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), np.float32)
    for index in range(count):
        image = sources[index % 2 if index % 5 else 2]  # mostly text, some scenes
        scale = rng.uniform(1.0, 3.0)
        grown = Image.fromarray(image).resize((int(image.shape[1] * scale), int(image.shape[0] * scale)), Image.BILINEAR)
        canvas = Image.new("RGB", (max(size, grown.width), max(size, grown.height)), (255, 255, 255))
        canvas.paste(grown, (0, 0))
        left, top = rng.integers(0, canvas.width - size + 1), rng.integers(0, canvas.height - size + 1)
        crop = np.asarray(canvas.crop((left, top, left + size, top + size)), np.float32) / 255.0
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[index] = ((crop - MEAN) / STD).transpose(2, 0, 1)
    return out
