"""The ``angular`` command: use trained models on new images (see :mod:`angular.serve.predict`).

    angular predict IMAGES... [--project DIR] [--head NAME | --ensemble RULE]
                              [--model PATH ...] [--temperature T] [--threshold X]
                              [--device auto|cpu|cuda] [--json]
    angular embed IMAGES... --out FILE.npz|.npy|.csv [--project DIR] [--item NAME]
                              [--model PATH ...] [--flip-test] [--device ...]
    angular export MODEL.pt --onnx OUT.onnx [--probabilities [--head NAME]
                              [--temperature T | --calibration FILE]] [--project DIR]

    angular enroll MODEL FOLDER --gallery G.npz [--flip-test] [--device ...]
    angular identify MODEL IMAGES... --gallery G.npz [--threshold X | --far F]
                              [--project DIR] [--json]

    angular pack images FOLDER OUT_DIR [--size 112] [--landmarks FILE]
    angular pack pairs PAIRS_FILE IMAGES_ROOT OUT.bin [--size 112]

``pack`` writes insightface's formats (:mod:`angular.data.recordio`,
:mod:`angular.data.verification_bin`): an image folder (one sub-folder per identity) as
``train.rec``/``train.idx``/``property``, and an LFW-style pairs file as a verification ``.bin``.

``--model`` of ``predict`` and ``embed`` (and MODEL of ``enroll`` / ``identify``) also takes an
``.onnx`` file written by ``export``.

IMAGES are image files or folders (searched recursively). ``predict`` prints one line per image:
its path, the identity (or ``unknown`` when the confidence is below the threshold), the
confidence, and the closest known identity; ``--json`` prints one JSON document instead. A bad
path, a folder without images, an unreadable image, a missing model or a bad option ends the
command with a one-line message on stderr and exit status 1 (2 for a malformed command line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from angular import heap

EXIT_ERROR = 1
DEBUG_VARIABLE = "ANGULAR_DEBUG"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    parser.add_argument(
        "--project",
        default=".",
        metavar="DIR",
        help="the project whose outputs/models, outputs/calibration and metrics/evaluate.json "
        "are used (default: the current folder)",
    )
    parser.add_argument(
        "--model",
        action="append",
        metavar="PATH",
        dest="model_paths",
        help="a model file to use instead of the project's (repeat for several)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (64)")


def build_parser() -> argparse.ArgumentParser:
    from angular.eval.ensemble import RULES

    parser = argparse.ArgumentParser(
        prog="angular", description="Use trained angular-margin models on images."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser(
        "predict",
        help="the identity of each image, or unknown",
        description="Print the identity of each image (or unknown when the calibrated "
        "confidence is below the open-set threshold). By default: the ensemble the pipeline "
        "evaluated (or its only head), the temperatures from calibration and the threshold "
        "evaluate chose on the validation images.",
    )
    _common(predict)
    choice = predict.add_mutually_exclusive_group()
    choice.add_argument("--head", metavar="NAME", help="use this head only (e.g. arcface)")
    choice.add_argument(
        "--ensemble", metavar="RULE", choices=RULES, help=f"combine every head: {', '.join(RULES)}"
    )
    predict.add_argument(
        "--temperature",
        type=float,
        help="the same temperature for every head instead of the calibrated ones "
        "(with --model the default is 1)",
    )
    predict.add_argument(
        "--threshold",
        type=float,
        help="open-set threshold on confidence instead of evaluate's (needed with --model)",
    )
    predict.add_argument("--json", action="store_true", help="print one JSON document")

    embed = commands.add_parser(
        "embed",
        help="write the embeddings of images to a file",
        description="Write unit-length embeddings of the images: one model's (--item), or the "
        "concatenation of every model's normalised embedding (as evaluate's ensemble).",
    )
    _common(embed)
    embed.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help=".npz (embeddings, paths, models), .npy (the array) or .csv (path, e0, e1, ...)",
    )
    embed.add_argument("--item", metavar="NAME", help="use this model only (e.g. arcface)")
    embed.add_argument(
        "--flip-test",
        action="store_true",
        help="add the embedding of each image's horizontal mirror",
    )

    export = commands.add_parser(
        "export",
        help="export a model to ONNX",
        description="Export a trained model (.pt) to ONNX: input `images` (B, C, H, W), "
        "preprocessed as in training, with a dynamic batch; output `embeddings` (B, D), and "
        "with --probabilities a head's calibrated class probabilities (B, classes).",
    )
    export.add_argument(
        "model", metavar="MODEL", help="a model file, e.g. outputs/models/arcface.pt"
    )
    export.add_argument("--onnx", required=True, metavar="OUT", help="the ONNX file to write")
    export.add_argument(
        "--probabilities",
        action="store_true",
        help="also output softmax(logits / T) of one head, T fitted by calibration",
    )
    export.add_argument("--head", metavar="NAME", help="the head (needed for a joint model)")
    temperature = export.add_mutually_exclusive_group()
    temperature.add_argument("--temperature", type=float, help="T instead of the fitted one")
    temperature.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibrate's file with the fitted T (default: "
        "<project>/outputs/calibration/<MODEL's name>.json)",
    )
    export.add_argument(
        "--project", default=".", metavar="DIR", help="the project (default: the current folder)"
    )

    enroll = commands.add_parser(
        "enroll",
        help="add people to a gallery (no retraining)",
        description="Enroll the people of FOLDER (one sub-folder of images per person) into a "
        "gallery: one template per person, the normalised mean of their unit embeddings. New "
        "people are added, people already enrolled are replaced. The gallery is written "
        "atomically.",
    )
    enroll.add_argument("model", metavar="MODEL", help="a model file (.pt or exported .onnx)")
    enroll.add_argument("folder", metavar="FOLDER", help="one sub-folder of images per person")
    _gallery_options(enroll)
    enroll.add_argument(
        "--flip-test",
        action="store_true",
        help="add the embedding of each image's mirror (as evaluate with "
        "evaluate.verification.flip_test; identify then does the same)",
    )

    identify = commands.add_parser(
        "identify",
        help="the enrolled person in each image, or unknown",
        description="Print the most similar enrolled person of each image and the cosine "
        "similarity, or unknown below the threshold (default: evaluate's verification threshold "
        "at the false accept rate evaluate.verification.gallery_far of params.yaml).",
    )
    identify.add_argument("model", metavar="MODEL", help="the model that enrolled the gallery")
    identify.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    _gallery_options(identify)
    threshold = identify.add_mutually_exclusive_group()
    threshold.add_argument("--threshold", type=float, help="cosine similarity threshold")
    threshold.add_argument(
        "--far",
        type=float,
        help="use evaluate's threshold at this false accept rate (default: params.yaml's)",
    )
    identify.add_argument(
        "--project",
        default=".",
        metavar="DIR",
        help="the project whose metrics/evaluate.json and params.yaml give the threshold",
    )
    identify.add_argument("--json", action="store_true", help="print one JSON document")
    _pack_parser(commands)
    return parser


def _pack_parser(commands) -> None:
    pack = commands.add_parser(
        "pack",
        help="write insightface's formats (.rec training sets, verification .bin)",
        description="Write the formats the public face data sets ship in, as insightface's tools "
        "lay them out. Faces are stored as RGB JPEG (quality 95) of SIZE x SIZE; a JPEG already "
        "so is kept byte for byte. Faces must be aligned: give `pack images` a landmarks file "
        "(--landmarks) or align them first.",
    )
    kinds = pack.add_subparsers(dest="pack_kind", required=True, metavar="KIND")
    images = kinds.add_parser(
        "images",
        help="an image folder into train.rec, train.idx and property",
        description="FOLDER holds one sub-folder of images per identity; labels follow the "
        "sorted sub-folder names, images the sorted file names.",
    )
    images.add_argument("folder", metavar="FOLDER", help="one sub-folder of images per identity")
    images.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write the set into")
    images.add_argument(
        "--landmarks",
        metavar="FILE",
        help="align each face onto the ArcFace template first, from FILE's five landmarks "
        "(TSV: path score x1 y1 ... x5 y5, paths relative to FOLDER)",
    )
    pairs = kinds.add_parser(
        "pairs",
        help="an LFW-style pairs file into a verification .bin",
        description="PAIRS_FILE is in LFW's pairs.txt format ('name n1 n2' for the same person, "
        "'name1 n1 name2 n2' for two people); the images are IMAGES_ROOT/name/name_0001.jpg.",
    )
    pairs.add_argument("pairs_file", metavar="PAIRS_FILE", help="LFW-style pairs.txt")
    pairs.add_argument("images_root", metavar="IMAGES_ROOT", help="one sub-folder per person")
    pairs.add_argument("out", metavar="OUT.bin", help="the .bin to write")
    for parser in (images, pairs):
        parser.add_argument(
            "--size", type=int, default=112, help="faces are SIZE x SIZE pixels (112)"
        )


def _gallery_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gallery", required=True, metavar="G", help="the gallery file (.npz)")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (64)")


def _run_predict(args) -> None:
    from angular.serve.predict import find_images, load_predictor

    images = find_images(args.images)  # path mistakes first, before loading any model
    predictor = load_predictor(
        args.project,
        head=args.head,
        ensemble=args.ensemble,
        model_paths=args.model_paths,
        temperature=args.temperature,
        threshold=args.threshold,
        device=args.device,
        batch_size=args.batch_size,
    )
    predictions = predictor.predict(images)
    if args.json:
        document = {
            "heads": predictor.heads,
            "rule": predictor.rule,
            "temperatures": predictor.temperatures,
            "threshold": predictor.threshold,
            "predictions": [p.to_dict() for p in predictions],
        }
        print(json.dumps(document, indent=2))
        return
    print(f"angular predict: {predictor.describe()}", file=sys.stderr)
    print("path\tidentity\tconfidence\tclosest")
    for p in predictions:
        identity = p.identity if p.known else "unknown"
        print(f"{p.path}\t{identity}\t{p.confidence:.4f}\t{p.closest}")
    unknown = sum(not p.known for p in predictions)
    print(
        f"angular predict: {len(predictions)} image(s), {len(predictions) - unknown} known, "
        f"{unknown} unknown",
        file=sys.stderr,
    )


def _run_embed(args) -> None:
    from angular.serve.predict import check_output, embed, find_images, write_embeddings

    images = find_images(args.images)  # path mistakes first, before loading any model
    check_output(args.out)
    result = embed(
        images,
        project=args.project,
        item=args.item,
        model_paths=args.model_paths,
        device=args.device,
        flip_test=args.flip_test,
        batch_size=args.batch_size,
        progress=True,
    )
    out = write_embeddings(result, args.out)
    print(
        f"angular embed: {len(result.paths)} embedding(s) of dimension {result.vectors.shape[1]} "
        f"({' + '.join(result.models)}) written to {out}",
        file=sys.stderr,
    )


def _run_export(args) -> None:
    from pathlib import Path

    from angular.serve.export import export_onnx
    from angular.serve.predict import CALIBRATION_DIR

    calibration = args.calibration
    if args.probabilities and args.temperature is None and calibration is None:
        calibration = Path(args.project) / CALIBRATION_DIR / f"{Path(args.model).stem}.json"
    out = export_onnx(
        args.model,
        args.onnx,
        probabilities=args.probabilities,
        head=args.head,
        temperature=args.temperature,
        calibration=calibration,
    )
    print(f"angular export: {args.model} -> {out} (checked against PyTorch)", file=sys.stderr)


def _run_enroll(args) -> None:
    from angular.serve.gallery import enroll

    gallery, added, replaced = enroll(
        args.model,
        args.folder,
        args.gallery,
        device=args.device,
        batch_size=args.batch_size,
        flip_test=args.flip_test,
    )
    print(
        f"angular enroll: {len(added)} added, {len(replaced)} replaced; {args.gallery} holds "
        f"{len(gallery)} people ({gallery.item}, embeddings of size {gallery.embedding_dim})",
        file=sys.stderr,
    )


def _gallery_far(project: str) -> tuple[float, str]:
    """``evaluate.verification.gallery_far`` of the project's params.yaml (1e-2 without it)."""
    from pathlib import Path

    import yaml

    path = Path(project) / "params.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        far = raw["evaluate"]["verification"]["gallery_far"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return 1e-2, "default"
    return float(far), f"{path}: evaluate.verification.gallery_far"


def _run_identify(args) -> None:
    from angular.serve.gallery import default_threshold, identify, load_gallery
    from angular.serve.predict import find_images

    images = find_images(args.images)  # path mistakes first, before loading any model
    threshold, source = args.threshold, "given"
    if threshold is None:
        far, far_source = (
            (args.far, "given") if args.far is not None else _gallery_far(args.project)
        )
        item = load_gallery(args.gallery).item
        threshold, source = default_threshold(args.project, item, far)
        source = f"{source} (FAR {far:g}, {far_source})"
    results = identify(
        args.model,
        args.gallery,
        images,
        threshold=threshold,
        device=args.device,
        batch_size=args.batch_size,
    )
    if args.json:
        document = {
            "gallery": str(args.gallery),
            "threshold": threshold,
            "threshold_source": source,
            "identifications": [r.to_dict() for r in results],
        }
        print(json.dumps(document, indent=2))
        return
    print(f"angular identify: threshold {threshold:.4f} ({source})", file=sys.stderr)
    print("path\tidentity\tsimilarity\tclosest")
    for r in results:
        print(f"{r.path}\t{r.identity if r.known else 'unknown'}\t{r.similarity:.4f}\t{r.closest}")
    unknown = sum(not r.known for r in results)
    print(
        f"angular identify: {len(results)} image(s), {len(results) - unknown} identified, "
        f"{unknown} unknown",
        file=sys.stderr,
    )


def _run_pack(args) -> int | None:
    from angular.data import DataError
    from angular.data.recordio import pack_images
    from angular.data.verification_bin import pack_pairs

    name = f"angular pack {args.pack_kind}"
    if args.size < 1:
        print(f"{name}: error: --size must be >= 1, got {args.size}", file=sys.stderr)
        return EXIT_ERROR
    try:
        if args.pack_kind == "images":
            count, classes = pack_images(
                args.folder, args.out_dir, size=args.size, landmarks=args.landmarks
            )
            done = f"{count} image(s) of {classes} identities written to {args.out_dir}"
        else:
            count, same = pack_pairs(args.pairs_file, args.images_root, args.out, size=args.size)
            done = f"{count} pairs ({same} same, {count - same} different) written to {args.out}"
    except DataError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{name}: {done}", file=sys.stderr)
    return None


COMMANDS = {
    "predict": _run_predict,
    "embed": _run_embed,
    "export": _run_export,
    "enroll": _run_enroll,
    "identify": _run_identify,
    "pack": _run_pack,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a malformed command line: usage and exit status 2
    name = f"angular {args.command}"
    heap.keep_freed_buffers_mapped()  # freed (B, C) buffers stay mapped (angular/heap.py)
    try:
        from angular.serve.export import ExportError
        from angular.serve.predict import PredictError

        try:
            status = COMMANDS[args.command](args)  # pack returns its exit status on bad data
        except (PredictError, ExportError) as error:
            print(f"{name}: error: {error}", file=sys.stderr)
            return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `angular predict ... | head`: the reader has gone, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as error:
        # Never a traceback for the user; one is there for whoever debugs it.
        if os.environ.get(DEBUG_VARIABLE):
            raise
        print(
            f"{name}: unexpected error: {type(error).__name__}: {error} "
            f"(set {DEBUG_VARIABLE}=1 to see the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
