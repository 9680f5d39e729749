"""Data: sources and the manifest of splits (:mod:`angular.data.manifest`, the prepare stage),
images, the Dataset and augmentation (:mod:`angular.data.images`), and insightface's formats:
RecordIO training sets (:mod:`angular.data.recordio`; a ``data.source: insightface_rec``
manifest's rows resolve to its :class:`PackedImage` records) and verification bins
(:mod:`angular.data.verification_bin`), and face alignment onto the ArcFace template
(:mod:`angular.data.align`, ``data.align`` in prepare). Bad data raises :class:`DataError`
(:mod:`angular.data.errors`)."""

from angular.data.align import align_face, read_landmarks, similarity_transform
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
from angular.data.recordio import PackedImage, PackedImages, RecordFile, write_record_folder
from angular.data.verification_bin import load_bin, read_bin, write_bin

__all__ = [
    "CLASSES_FILE",
    "MANIFEST_FILE",
    "SPLITS",
    "DataError",
    "ImageDataset",
    "Manifest",
    "PackedImage",
    "PackedImages",
    "Record",
    "RecordFile",
    "align_face",
    "build_augmentation",
    "load_bin",
    "load_image",
    "normalize",
    "prepare_dataset",
    "read_bin",
    "read_landmarks",
    "read_manifest",
    "similarity_transform",
    "write_bin",
    "write_record_folder",
]
