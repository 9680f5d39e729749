"""A small synthetic verification ``.bin`` for the tests of training with ``train.verification``
(tests/train/test_verification_train.py, tests/distributed/test_distributed_steps.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from angular.data.verification_bin import write_bin


def synthetic_bin(path: Path, pairs: int = 12, seed: int = 0) -> Path:
    """``pairs`` pairs of random 20 x 20 RGB JPEGs written as a .bin: the even pairs "same" (a
    picture and a noisy copy), the odd ones two pictures."""
    rng = np.random.default_rng(seed)

    def jpeg(pixels) -> bytes:
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=95)
        return out.getvalue()

    images, same = [], []
    for index in range(pairs):
        first = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        if index % 2 == 0:
            noise = rng.integers(-20, 21, first.shape)
            second = np.clip(first.astype(int) + noise, 0, 255).astype(np.uint8)
        else:
            second = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        images += [jpeg(first), jpeg(second)]
        same.append(index % 2 == 0)
    write_bin(path, images, same)
    return path
