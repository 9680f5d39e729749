"""The ``angular`` command: use trained models on new images (see :mod:`angular.serve.predict`).

    angular predict IMAGES... [--project DIR] [--head NAME | --ensemble RULE]
                              [--model PATH ...] [--temperature T] [--threshold X]
                              [--device auto|cpu|cuda] [--json]
    angular embed IMAGES... --out FILE.npz|.npy|.csv [--project DIR] [--item NAME]
                              [--model PATH ...] [--flip-test] [--device ...]

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
    return parser


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
    )
    out = write_embeddings(result, args.out)
    print(
        f"angular embed: {len(result.paths)} embedding(s) of dimension {result.vectors.shape[1]} "
        f"({' + '.join(result.models)}) written to {out}",
        file=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a malformed command line: usage and exit status 2
    name = f"angular {args.command}"
    try:
        from angular.serve.predict import PredictError

        try:
            (_run_predict if args.command == "predict" else _run_embed)(args)
        except PredictError as error:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
