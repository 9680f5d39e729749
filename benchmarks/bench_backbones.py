"""Images per second of the backbones on CPU: a training step and inference, side by side.

    python benchmarks/bench_backbones.py                       # the default grid (64x64 and 112x112)
    python benchmarks/bench_backbones.py --sizes 64 --backbones small_cnn mobilefacenet --repeats 3
    python benchmarks/bench_backbones.py --data ../shared/data/lfw-dev   # + the input pipeline
    python benchmarks/bench_backbones.py --checkpoint --backbones iresnet18 mobilefacenet

For each backbone and input size (batch ``--batch``, one grey channel, ``--threads`` threads):

- ``train``: forward, an ArcFace head's loss (``--classes`` classes), backward and an Adam step;
- ``infer``: the forward in evaluation mode under ``torch.no_grad``;

each in three variants: ``fp32`` (as the pipeline runs today), ``channels_last`` (the model and the
batch in NHWC) and ``bf16`` (``torch.autocast("cpu", torch.bfloat16)``, as ``train.bf16``). A
variant is timed ``--repeats`` times after ``--warmup`` untimed calls; the table gives the median
images/s and its ratio to ``fp32`` of the same backbone measured in the same run.

With ``--checkpoint`` it compares, instead of the variants, a forward and backward in train mode
(fp32, no head) of each face backbone without and with activation checkpointing
(``model.<backbone>.checkpoint``): the peak memory allocated during the step beyond what was
allocated before it (the profiler's CPU allocation events, ``harness.peak_extra_cpu``) and the
median seconds.

With ``--data`` it also times the input side of an epoch on that image folder: decoding every JPEG
(crop, resize) each epoch against augmenting cached decoded images (``train.preload_images``), and
a DataLoader with 0 against 2 workers. Writes ``bench_backbones.json`` and ``bench_backbones.md``
into ``--out``; quote the load average printed with the table (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import harness
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from angular.nn.backbones import FACE_BACKBONES, build_backbone
from angular.nn.heads import MarginHead, MarginSpec

# The faces experiment's small VGG (docs/faces.md); the ResNet-18 of the project; the face backbones.
SMALL_CNN = {"width": 32, "dropout": 0.0, "blocks": 3, "convs_per_block": 2}
DEFAULT_BACKBONES = ("small_cnn", "resnet18", "mobilefacenet", "iresnet18")
VARIANTS = ("fp32", "channels_last", "bf16")
AUGMENT = v2.Compose(
    [
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=0.5),
    ]
)


def make_backbone(
    name: str, size: int, embedding_dim: int, checkpoint: bool = False
) -> torch.nn.Module:
    options = {}
    if name == "small_cnn":
        options = dict(SMALL_CNN)
    elif name in FACE_BACKBONES:
        options = {"input_size": (size, size), "checkpoint": checkpoint}
    return build_backbone(name, in_channels=1, embedding_dim=embedding_dim, **options)


def _median_rate(call, images: int, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Images per second of the median call, and the seconds of every timed call."""
    seconds = harness.timed_runs(call, warmup, repeats)
    return images / statistics.median(seconds), seconds


def time_backbone(name: str, size: int, variant: str, args) -> dict:
    torch.manual_seed(0)
    net = make_backbone(name, size, args.embedding_dim)
    head = MarginHead(args.embedding_dim, args.classes, MarginSpec.arcface(32.0, 0.3))
    images = torch.randn(args.batch, 1, size, size)
    labels = torch.randint(0, args.classes, (args.batch,))
    if variant == "channels_last":
        net = net.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = variant == "bf16"
    optimizer = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=1e-3)

    def train_step():
        net.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = head.loss(net(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer():
        net.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            net(images)

    train, train_s = _median_rate(train_step, args.batch, args.warmup, args.repeats)
    infer_rate, infer_s = _median_rate(infer, args.batch, args.warmup, args.repeats)
    return {
        "backbone": name,
        "size": size,
        "variant": variant,
        "parameters": sum(p.numel() for p in net.parameters()),
        "train_images_per_s": train,
        "infer_images_per_s": infer_rate,
        "train_seconds": train_s,
        "infer_seconds": infer_s,
    }


def measure_checkpointing(name: str, size: int, args) -> list[dict]:
    """Peak extra bytes and seconds of a forward + backward without and with checkpointing."""
    rows = []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        net = make_backbone(name, size, args.embedding_dim, checkpoint).train()
        images = torch.randn(args.batch, 1, size, size)

        def step(inp, net=net):
            net.zero_grad(set_to_none=True)
            net(inp).square().sum().backward()

        seconds = harness.timed_runs(
            lambda step=step, images=images: step(images), args.warmup, args.repeats
        )
        # After the timing (the profiler's hooks may slow the steps after it), on a warm allocator.
        peak = harness.peak_extra_cpu(step, images)
        rows.append(
            {
                "backbone": name,
                "size": size,
                "checkpoint": checkpoint,
                "peak_extra_bytes": peak,
                "median_seconds": statistics.median(seconds),
                "seconds": seconds,
            }
        )
    return rows


def checkpoint_markdown(rows: list[dict], args, load: tuple) -> str:
    lines = [
        f"CPU `{platform.processor() or platform.machine()}`, {args.threads} thread(s), batch "
        f"{args.batch}, one grey channel, fp32; a forward and backward in train mode; median of "
        f"{args.repeats} after {args.warmup} warm-up; load average before / after: "
        f"{load[0]:.2f} / {load[1]:.2f}.",
        "",
        *harness.table_header(
            ["backbone", "input", "checkpoint", "peak extra MiB", "vs off", "seconds", "vs off"],
            align="--- --- --- ---: ---: ---: ---:",
        ),
    ]
    off = {(r["backbone"], r["size"]): r for r in rows if not r["checkpoint"]}
    for r in rows:
        ref = off[(r["backbone"], r["size"])]
        lines.append(
            f"| {r['backbone']} | {r['size']}x{r['size']} | {'on' if r['checkpoint'] else 'off'} "
            f"| {r['peak_extra_bytes'] / 2**20:.1f} | "
            f"{r['peak_extra_bytes'] / ref['peak_extra_bytes']:.2f}x | "
            f"{r['median_seconds']:.3f} | {r['median_seconds'] / ref['median_seconds']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


class _Folder(Dataset):
    """Images of a folder of identities: decoded per item, or from a cache decoded once."""

    def __init__(self, paths, size: int, crop: int, cached: bool):
        self.paths, self.size, self.crop = paths, size, crop
        self.cache = [self._decode(p) for p in paths] if cached else None

    def _decode(self, path):
        # As prepare + train do: decode, crop, convert to grey, resize (bilinear), uint8 tensor.
        with Image.open(path) as image:
            width, height = image.size
            left, top = (width - self.crop) // 2, (height - self.crop) // 2
            image = image.crop((left, top, left + self.crop, top + self.crop)).convert("L")
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
            return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())[None]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = self.cache[index] if self.cache is not None else self._decode(self.paths[index])
        return AUGMENT(image.float().div_(255.0))


def time_input(folder: Path, args) -> list[dict]:
    """One epoch of images through a DataLoader: decoding every epoch vs cached, 0 vs 2 workers."""
    paths = sorted(folder.rglob("*.jpg"))[: args.data_images]
    rows = []
    for cached in (False, True):
        dataset = _Folder(paths, args.data_size, args.data_crop, cached)
        for workers in (0, 2):
            loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=workers)

            def epoch(loader=loader):
                for _ in loader:
                    pass

            rate, seconds = _median_rate(epoch, len(paths), 0, args.data_repeats)
            rows.append(
                {"cached": cached, "workers": workers, "images_per_s": rate, "seconds": seconds}
            )
    return rows


def markdown(rows: list[dict], input_rows: list[dict], args, load: tuple) -> str:
    lines = [
        f"CPU `{platform.processor() or platform.machine()}`, {args.threads} thread(s), batch "
        f"{args.batch}, one grey channel, ArcFace head over {args.classes} classes; median of "
        f"{args.repeats} after {args.warmup} warm-up; load average before / after: "
        f"{load[0]:.2f} / {load[1]:.2f}.",
        "",
        *harness.table_header(
            [
                "backbone",
                "input",
                "parameters",
                "variant",
                "train img/s",
                "vs fp32",
                "infer img/s",
                "vs fp32",
            ],
            align="--- --- ---: --- ---: ---: ---: ---:",
        ),  # fmt: skip
    ]
    base = {(r["backbone"], r["size"]): r for r in rows if r["variant"] == "fp32"}
    for r in rows:
        ref = base.get((r["backbone"], r["size"]))
        train_ratio = r["train_images_per_s"] / ref["train_images_per_s"] if ref else float("nan")
        infer_ratio = r["infer_images_per_s"] / ref["infer_images_per_s"] if ref else float("nan")
        lines.append(
            f"| {r['backbone']} | {r['size']}x{r['size']} | {r['parameters'] / 1e6:.2f}M | "
            f"{r['variant']} | {r['train_images_per_s']:.1f} | {train_ratio:.2f}x | "
            f"{r['infer_images_per_s']:.1f} | {infer_ratio:.2f}x |"
        )
    if input_rows:
        lines += [
            "",
            f"Input pipeline: {args.data_images} JPEGs, central {args.data_crop} px crop, "
            f"{args.data_size}x{args.data_size}, flip + affine augmentation; median of "
            f"{args.data_repeats} epochs.",
            "",
            *harness.table_header(
                ["decoded images", "DataLoader workers", "img/s"], align="--- ---: ---:"
            ),
        ]
        for r in input_rows:
            kind = "cached (decoded once)" if r["cached"] else "decoded every epoch"
            lines.append(f"| {kind} | {r['workers']} | {r['images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 112])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--checkpoint",
        action="store_true",
        help="compare the face backbones without and with activation checkpointing instead",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, help="a folder of identities of JPEGs (lfw-dev)")
    parser.add_argument("--data-images", type=int, default=512)
    parser.add_argument("--data-size", type=int, default=64)
    parser.add_argument("--data-crop", type=int, default=128)
    parser.add_argument("--data-repeats", type=int, default=3)
    harness.add_out_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    before = os.getloadavg()[0]
    if args.checkpoint:
        return run_checkpointing(args, before)
    rows = []
    for size in args.sizes:
        for name in args.backbones:
            for variant in args.variants:
                row = time_backbone(name, size, variant, args)
                rows.append(row)
                print(
                    f"{name} {size}x{size} {variant}: train {row['train_images_per_s']:.1f} "
                    f"img/s, infer {row['infer_images_per_s']:.1f} img/s",
                    flush=True,
                )
    input_rows = time_input(args.data, args) if args.data else []
    load = (before, os.getloadavg()[0])
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"rows": rows, "input": input_rows, "load_average": load, "args": vars(args)}
    (args.out / "bench_backbones.json").write_text(
        json.dumps(document, indent=1, default=str), encoding="utf-8"
    )
    table = markdown(rows, input_rows, args, load)
    (args.out / "bench_backbones.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


def run_checkpointing(args, before: float) -> int:
    """``--checkpoint``: writes ``bench_checkpointing.json`` and ``bench_checkpointing.md``."""
    rows = []
    for size in args.sizes:
        for name in (name for name in args.backbones if name in FACE_BACKBONES):
            for row in measure_checkpointing(name, size, args):
                rows.append(row)
                print(
                    f"{name} {size}x{size} checkpoint={row['checkpoint']}: peak extra "
                    f"{row['peak_extra_bytes'] / 2**20:.1f} MiB, {row['median_seconds']:.3f} s",
                    flush=True,
                )
    load = (before, os.getloadavg()[0])
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"rows": rows, "load_average": load, "args": vars(args)}
    (args.out / "bench_checkpointing.json").write_text(
        json.dumps(document, indent=1, default=str), encoding="utf-8"
    )
    table = checkpoint_markdown(rows, args, load)
    (args.out / "bench_checkpointing.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
