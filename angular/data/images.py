"""Images: decoding and resizing, normalisation, the training/inference Dataset, augmentation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from angular.config import AugmentSpec, ConfigError, Crop
from angular.data.errors import DataError
from angular.data.manifest import crop_region
from angular.data.recordio import PackedImage, PackedImages

__all__ = ["load_image", "normalize", "ImageDataset", "build_augmentation"]


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greys (PNG, TIFF) scaled to 8 bits; PIL's own conversion clips them to white."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8), "L")


def load_image(
    path: str | Path | PackedImage,
    *,
    image_size: Sequence[int],
    channels: int,
    crop: Crop | None = None,
) -> torch.Tensor:
    """An image file, or a :class:`~angular.data.recordio.PackedImage` (a record of a RecordIO
    set), as a (channels, height, width) uint8 tensor: upright (as its EXIF orientation says),
    cropped to ``crop`` (``data.crop``), converted to grey (``channels`` 1) or RGB (3) whatever
    the source's colours, and resized (bilinear) to ``image_size``."""
    try:
        with path.decode() if isinstance(path, PackedImage) else Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if crop is not None:
                region = crop_region(crop, *image.size)
                if region is None:
                    raise DataError(
                        f"{path}: data.crop {list(crop.box)} lies outside the image "
                        f"({image.width}x{image.height})"
                    )
                image = image.crop(region)
            image = _eight_bit(image).convert("L" if channels == 1 else "RGB")
            height, width = image_size
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        if isinstance(error, DataError):  # a bad record: the reader's line names it
            raise
        raise DataError(f"{path}: cannot read the image ({error}); rerun prepare") from error
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or [0, 1] float images (..., C, H, W) -> ``(x - mean) / std`` per channel, float32."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    shape = (-1, 1, 1)
    mean_t = torch.tensor(mean, dtype=images.dtype).view(shape)
    std_t = torch.tensor(std, dtype=images.dtype).view(shape)
    return (images - mean_t) / std_t


class ImageDataset(Dataset):
    """Images of a manifest split: ``(normalised float image (C, H, W), label)`` per item.

    ``paths``: image files, or :class:`~angular.data.recordio.PackedImage` records (what
    :meth:`angular.data.Manifest.paths` gives for each source); records are read by offset, in
    each DataLoader worker through its own file handle.

    ``preload`` decodes every image once (into one uint8 tensor); otherwise each access decodes.
    ``augment`` (training only) is applied to the [0, 1] image before normalising.
    """

    def __init__(
        self,
        paths: Sequence[Path | PackedImage],
        labels: Sequence[int],
        *,
        image_size: Sequence[int],
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        preload: bool = True,
        crop: Crop | None = None,
    ):
        if len(paths) != len(labels):
            raise ValueError(f"paths has {len(paths)} entries but labels has {len(labels)}")
        # Records of one set are held as one index array (PackedImages), files as paths.
        self.paths = PackedImages.of(paths) or [
            p if isinstance(p, PackedImage) else Path(p) for p in paths
        ]
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.image_size = tuple(image_size)
        self.channels = channels
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        self.crop = crop  # data.crop, for images that prepare did not crop (a pairs file's)
        self.images = None
        if preload and self.paths:
            self.images = torch.stack([self._decode(i) for i in range(len(self.paths))])

    def _decode(self, index: int) -> torch.Tensor:
        return load_image(
            self.paths[index], image_size=self.image_size, channels=self.channels, crop=self.crop
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = self.images[index] if self.images is not None else self._decode(index)
        image = image.float() / 255.0
        if self.augment is not None:
            image = self.augment(image)
        return normalize(image, self.mean, self.std), self.labels[index]


def build_augmentation(specs: Sequence[AugmentSpec]) -> Callable | None:
    """``torchvision.transforms.v2.Compose`` of the transforms listed in ``train.augment``; a bad
    name or argument is a :class:`ConfigError` naming its entry."""
    if not specs:
        return None
    from torchvision.transforms import v2

    transforms = []
    for spec in specs:
        factory = getattr(v2, spec.name, None)
        if not isinstance(factory, type) or not issubclass(factory, v2.Transform):
            raise ConfigError(
                f"{spec.key}.name",
                f"{spec.name!r} is not a transform of torchvision.transforms.v2 "
                "(e.g. RandomAffine, RandomHorizontalFlip, RandomResizedCrop, ColorJitter)",
            )
        try:
            transforms.append(factory(**spec.kwargs))
        except (TypeError, ValueError) as error:
            raise ConfigError(spec.key, f"{spec.name}({spec.kwargs}) failed: {error}") from None
    return v2.Compose(transforms)
