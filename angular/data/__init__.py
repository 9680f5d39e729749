"""Data: sources and the manifest of splits (:mod:`angular.data.manifest`, the prepare stage),
and images, the Dataset and augmentation (:mod:`angular.data.images`)."""

from angular.data.images import ImageDataset, build_augmentation, load_image, normalize
from angular.data.manifest import (
    CLASSES_FILE,
    MANIFEST_FILE,
    SPLITS,
    DataError,
    Manifest,
    Record,
    prepare_dataset,
    read_manifest,
)

__all__ = [
    "CLASSES_FILE",
    "MANIFEST_FILE",
    "SPLITS",
    "DataError",
    "ImageDataset",
    "Manifest",
    "Record",
    "build_augmentation",
    "load_image",
    "normalize",
    "prepare_dataset",
    "read_manifest",
]
