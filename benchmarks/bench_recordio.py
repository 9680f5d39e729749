"""Reading faces for training: decoded images/s from an insightface ``.rec`` (``angular.data.
RecordFile``) against an image folder of the same faces (one JPEG file per face), with 0, 1 and 2
DataLoader workers.

The faces are those of ``--source`` (an insightface RecordIO folder; by default the MXNet-written
fixture ``../shared/data/insightface`` when it is there), else ``--synthetic`` random 112x112 JPEG
faces written here with ``write_record_folder``. The image folder is the same JPEG bytes written as
files into a temporary folder. Each item is decoded to an RGB uint8 tensor (C, H, W) with its
label, in batches of ``--batch-size``; the workers persist across epochs, and one untimed epoch
warms them and the page cache (both sources are read from memory: this measures the reading and
decoding, not the disk). The figure is the median over ``--repeats`` epochs.

``python benchmarks/bench_recordio.py`` writes ``OUT/bench_recordio.{json,md}``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
from pathlib import Path

import harness
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from angular.data import RecordFile, write_record_folder

FIXTURE = (harness.REPOSITORY / "../shared/data/insightface").resolve()
WORKERS = (0, 1, 2)


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


def images_per_second(dataset: Dataset, workers: int, batch_size: int, repeats: int) -> dict:
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0
    )

    def epoch() -> None:
        for _ in loader:
            pass

    seconds = harness.timed_runs(epoch, 1, repeats)
    rates = [len(dataset) / s for s in seconds]
    median, iqr = harness.quantiles(rates)
    return dict(images_per_s=median, iqr=iqr, epochs=repeats)


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
        datasets = {
            ".rec (RecordFile)": torch.utils.data.Subset(reader, range(count)),
            "image folder (JPEG files)": FolderFaces(items),
        }
        rows = []
        for workers in WORKERS:
            for name, dataset in datasets.items():
                result = images_per_second(dataset, workers, args.batch_size, args.repeats)
                rows.append(dict(source=name, workers=workers, **result))
                print(rows[-1], flush=True)

    machine = harness.machine_description("cpu", torch.get_num_threads())
    by = {(row["source"], row["workers"]): row["images_per_s"] for row in rows}
    lines = [
        "# Reading faces: .rec against an image folder",
        "",
        f"- Faces: {count} from {label}; batch {args.batch_size}; median of {args.repeats} "
        "epochs after a warm-up epoch (page cache warm)",
        harness.machine_line(machine),
        "",
        *harness.table_header(
            ["workers", ".rec images/s", "folder images/s", ".rec / folder"], "---: ---: ---: ---:"
        ),
    ]
    for workers in WORKERS:
        rec, folder = by[(".rec (RecordFile)", workers)], by[("image folder (JPEG files)", workers)]
        lines.append(
            harness.table_row(
                [str(workers), f"{rec:,.0f}", f"{folder:,.0f}", f"{rec / folder:.2f}"]
            )
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    harness.replace_file(args.out / "bench_recordio.md", text)
    document = dict(
        machine=machine,
        faces=count,
        source=label,
        rows=rows,
        median_ratio=statistics.median(
            by[(".rec (RecordFile)", w)] / by[("image folder (JPEG files)", w)] for w in WORKERS
        ),
    )
    harness.replace_file(args.out / "bench_recordio.json", harness.json_text(document))


if __name__ == "__main__":
    main()
