"""Reading faces for training: decoded images/s from an insightface ``.rec`` (``angular.data.
RecordFile``) against an image folder of the same faces (one JPEG file per face), with 0, 1 and 2
DataLoader workers.

The faces are those of ``--source`` (an insightface RecordIO folder; by default the MXNet-written
fixture ``../shared/data/insightface`` when it is there), else ``--synthetic`` random 112x112 JPEG
faces written here with ``write_record_folder``. The image folder is the same JPEG bytes written as
files into a temporary folder. Each item is decoded to an RGB uint8 tensor (C, H, W) with its
label, in batches of ``--batch-size``; the workers persist across epochs, and one untimed epoch
warms them and the page cache (both sources are read from memory: this measures the reading and
decoding, not the disk). The figure is the median over ``--repeats`` epochs of each, the two
sources' epochs interleaved (a change in the machine's load falls on both).

With ``--pipeline`` both sides go through what the trainer reads (``angular.data.ImageDataset``,
``preload`` off): the ``.rec``'s images as the manifest of a ``data.source: insightface_rec`` set
gives them (``PackedImage`` records), the folder's as paths, each decoded, converted to RGB,
resized to ``--image-size`` and normalised.

``python benchmarks/bench_recordio.py`` writes ``OUT/bench_recordio.{json,md}``
(``OUT/bench_recordio_pipeline.{json,md}`` with ``--pipeline``).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from angular.data import ImageDataset, RecordFile, write_record_folder

FIXTURE = (harness.REPOSITORY / "../shared/data/insightface").resolve()
WORKERS = (0, 1, 2)
REC, FOLDER = ".rec (RecordFile)", "image folder (JPEG files)"


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())


class FolderFaces(Dataset):
    """The same faces as JPEG files: what a plain image-folder dataset does per item."""

    def __init__(self, items: list[tuple[Path, int]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        with Image.open(path) as image:
            return to_tensor(image.convert("RGB")), label


def synthetic_set(folder: Path, count: int, classes: int = 20) -> Path:
    """``count`` random smooth 112x112 faces (JPEG quality 95) in ``classes`` classes."""
    rng = np.random.default_rng(0)

    def faces():
        for index in range(count):
            coarse = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
            pixels = np.repeat(np.repeat(coarse, 8, 0), 8, 1)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
            yield index * classes // count, buffer.getvalue()

    write_record_folder(folder, faces())
    return folder


def image_folder(reader: RecordFile, folder: Path, count: int) -> list[tuple[Path, int]]:
    items = []
    for index in range(count):
        label, data = reader.image_record(index)
        path = folder / f"{label:05d}" / f"{index:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        items.append((path, label))
    return items


def images_per_second(datasets: dict, workers: int, batch_size: int, repeats: int) -> dict:
    """Median images/s (and IQR) of each dataset's epochs, the datasets' epochs interleaved so
    that a change in the machine's load falls on all of them alike."""
    loaders = {
        name: DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0
        )
        for name, dataset in datasets.items()
    }
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for round_ in range(repeats + 1):  # round 0 starts the workers and warms the caches
        for name, loader in loaders.items():
            start = time.perf_counter()
            for _ in loader:
                pass
            if round_:
                rates[name].append(len(datasets[name]) / (time.perf_counter() - start))
    return {name: harness.quantiles(values) for name, values in rates.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=None, help="an insightface RecordIO folder")
    parser.add_argument(
        "--synthetic",
        type=harness.positive_int("--synthetic"),
        default=2000,
        help="random faces to write when there is no source (2000)",
    )
    parser.add_argument(
        "--images",
        type=harness.positive_int("--images"),
        default=None,
        help="read only the first N faces",
    )
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="read both through angular.data.ImageDataset, as the trainer does",
    )
    parser.add_argument(
        "--image-size",
        type=harness.positive_int("--image-size"),
        default=112,
        help="with --pipeline: the side images are resized to (112)",
    )
    parser.add_argument("--batch-size", type=harness.positive_int("--batch-size"), default=64)
    parser.add_argument("--repeats", type=harness.positive_int("--repeats"), default=3)
    harness.add_out_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the workers, not intra-op threads, are what is compared

    with tempfile.TemporaryDirectory() as temporary:
        temporary = Path(temporary)
        source = args.source or (FIXTURE if (FIXTURE / "train.rec").is_file() else None)
        label = str(source) if source else f"{args.synthetic} synthetic faces"
        if source is None:
            source = synthetic_set(temporary / "rec", args.synthetic)
        reader = RecordFile(source, transform=to_tensor)
        count = min(args.images or len(reader), len(reader))
        items = image_folder(reader, temporary / "folder", count)
        datasets = {REC: torch.utils.data.Subset(reader, range(count)), FOLDER: FolderFaces(items)}
        if args.pipeline:
            datasets = pipeline_datasets(reader, items, args.image_size)
        fetch = fetch_microseconds(reader, items)
        rows = []
        for workers in WORKERS:
            results = images_per_second(datasets, workers, args.batch_size, args.repeats)
            for name, (median, iqr) in results.items():
                rows.append(dict(source=name, workers=workers, images_per_s=median, iqr=iqr))
                print(rows[-1], flush=True)

    machine = harness.machine_description("cpu", torch.get_num_threads())
    by = {(row["source"], row["workers"]): row for row in rows}
    through = (
        f"; through ImageDataset (decode, RGB, resize to {args.image_size}x{args.image_size}, "
        "normalise), as the trainer reads them"
        if args.pipeline
        else ""
    )
    lines = [
        "# Reading faces: .rec against an image folder",
        "",
        f"- Faces: {count} from {label}; batch {args.batch_size}; median (IQR) of {args.repeats} "
        f"interleaved epochs each, after a warm-up epoch (page cache warm){through}",
        f"- Fetching the encoded bytes alone, no decoding (in-process, median of 5 passes): "
        f".rec {fetch[REC]:.1f} us/image, folder {fetch[FOLDER]:.1f} us/image",
        harness.machine_line(machine),
        "",
        *harness.table_header(
            ["workers", ".rec images/s", "folder images/s", ".rec / folder"], "---: ---: ---: ---:"
        ),
    ]
    for workers in WORKERS:
        rec, folder = by[(REC, workers)], by[(FOLDER, workers)]
        cells = [f"{row['images_per_s']:,.0f} ({row['iqr']:,.0f})" for row in (rec, folder)]
        ratio = rec["images_per_s"] / folder["images_per_s"]
        lines.append(harness.table_row([str(workers), *cells, f"{ratio:.2f}"]))
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "bench_recordio_pipeline" if args.pipeline else "bench_recordio"
    harness.replace_file(args.out / f"{name}.md", text)
    document = dict(machine=machine, faces=count, source=label, fetch_us_per_image=fetch, rows=rows)
    if args.pipeline:
        document["image_size"] = args.image_size
    harness.replace_file(args.out / f"{name}.json", harness.json_text(document))


def pipeline_datasets(reader: RecordFile, items: list[tuple[Path, int]], size: int) -> dict:
    """The trainer's Dataset on both sources: the records (as a prepared manifest resolves
    them) and the files, the same faces in the same order."""
    common = dict(
        image_size=(size, size), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, preload=False
    )
    labels = [label for _, label in items]
    records = [reader.image(index) for index in range(len(items))]
    return {
        REC: ImageDataset(records, labels, **common),
        FOLDER: ImageDataset([path for path, _ in items], labels, **common),
    }


def fetch_microseconds(reader: RecordFile, items: list[tuple[Path, int]]) -> dict[str, float]:
    """Microseconds per image to get the encoded bytes: the .rec record, or the file's bytes."""
    actions = {
        REC: lambda: [reader.image_record(i) for i in range(len(items))],
        FOLDER: lambda: [path.read_bytes() for path, _ in items],
    }
    return {
        name: 1e6 * statistics.median(harness.timed_runs(action, 1, 5)) / len(items)
        for name, action in actions.items()
    }


if __name__ == "__main__":
    main()
