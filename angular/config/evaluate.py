"""The ``calibrate`` and ``evaluate`` sections: the temperature of each member, then the ensembles,
the open-set threshold and verification."""

from pathlib import PurePath
from typing import Annotated, Literal

from pydantic import BeforeValidator, WithJsonSchema, model_validator

from angular.config.rules import (
    UNIQUE,
    Section,
    choice,
    flag,
    integer,
    is_number,
    number,
    problem,
    text,
    unique,
)
from angular.eval.ensemble import MEMBER_RULES, RULES
from angular.eval.verification import DEFAULT_FARS

CALIBRATION_METHODS = ("fit", "fixed")


class CalibrateConfig(Section):
    """``calibrate``: the softmax temperature of each member."""

    method: choice(*CALIBRATION_METHODS)
    temperature: number(0.0, low_open=True)
    n_bins: integer(1)
    max_iter: integer(1)
    batch_size: integer(1)
    num_threads: integer(0)


def _bins(value):
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise problem(f"must be a list of verification set files (.bin), got {value!r}")
    stems = [PurePath(path).stem for path in value]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise problem(
            f"names two sets {repeated[0]!r}: the metrics are keyed by the file name, so the "
            f"files must have distinct names, got {value!r}"
        )
    return value


def _fars(value):
    if not isinstance(value, list) or not value:
        raise problem(f"must be a non-empty list of false accept rates in (0, 1), got {value!r}")
    for far in value:
        if not (is_number(far) and 0.0 < far < 1.0):
            raise problem(f"must be false accept rates in (0, 1), got {far!r} in {value!r}")
    return [float(far) for far in value]


class VerificationConfig(Section):
    """``evaluate.verification``: pairs of test images and of unknown images."""

    impostors_per_genuine: number(0.0, low_open=True, optional=True)  # null: every impostor pair
    max_impostors: integer(1, optional=True)
    folds: integer(2)
    seed: integer(0)
    # An LFW-style pairs.txt (relative to the folder the stage runs in): its pairs of test and
    # unknown images are scored besides the drawn ones (None: only the drawn pairs).
    pairs_file: text(optional=True) = None
    # A folder under which the pairs file's images are found (anywhere below it, by the file name
    # <name>_<NNNN>.<ext>), embedded by each model; pairs that touch a known (training) identity are
    # dropped and counted. None: the pairs name test or unknown images of the prepared data.
    pairs_root: text(optional=True) = None
    # Embed each image and its horizontal mirror and add the two normalised embeddings.
    flip_test: flag() = False
    # The false accept rate whose threshold (threshold@far=F of each embedding, on these pairs)
    # `angular identify` uses by default to reject people who are not in the gallery.
    gallery_far: number(0.0, 1.0, low_open=True, high_open=True) = 1e-2
    # insightface's verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin, ...; relative to the
    # folder the stage runs in), each scored by insightface's protocol (angular.eval.bins) with
    # every trained model; reported under its file name ([]: none).
    bins: Annotated[
        tuple[str, ...],
        BeforeValidator(_bins),
        WithJsonSchema({"type": "array", "items": {"type": "string", "pattern": r"\S"}}),
        UNIQUE,
    ] = ()
    # The false accept rates of every TAR the stage reports (drawn pairs, the pairs file, the
    # sets), in this order; e.g. [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1] as IJB-C is quoted.
    fars: Annotated[
        tuple[float, ...],
        BeforeValidator(_fars),
        unique("a false accept rate"),
        WithJsonSchema(
            {
                "type": "array",
                "minItems": 1,
                "items": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            }
        ),
        UNIQUE,
    ] = DEFAULT_FARS

    @model_validator(mode="after")
    def _root_of_a_pairs_file(self):
        if self.pairs_root is not None and self.pairs_file is None:
            raise problem(
                "only used with evaluate.verification.pairs_file; set it to null", "pairs_root"
            )
        return self


def _rules(value):
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise problem(f"must be a list of ensemble rules ({', '.join(RULES)}), got {value!r}")
    for rule in value:
        if rule not in RULES:
            raise problem(f"unknown ensemble rule {rule!r}; known: {', '.join(RULES)}")
    return value


def _threshold(value):
    if value == "val":
        return None
    if not (is_number(value) and 0.0 <= value <= 1.0):
        raise problem(
            f"must be val (chosen on the validation split) or a confidence in [0, 1], got {value!r}"
        )
    return float(value)


class MembersConfig(Section):
    """``evaluate.members``: which heads join the ensembles, judged on the validation split."""

    rule: choice(*MEMBER_RULES)
    threshold: number(0.0, 1.0)


class EvaluateConfig(Section):
    """``evaluate``: the ensemble rules, the open-set threshold and verification."""

    rules: Annotated[tuple[Literal[RULES], ...], BeforeValidator(_rules), unique("a rule"), UNIQUE]
    # None: chosen on the validation split (threshold: val)
    threshold: Annotated[
        float | None,
        BeforeValidator(_threshold),
        WithJsonSchema(
            {"anyOf": [{"const": "val"}, {"type": "number", "minimum": 0, "maximum": 1}]}
        ),
    ]
    known_rate: number(0.0, 1.0, low_open=True)
    # The second open-set operating point: the threshold that accepts at most this share of the
    # unknown people's images (chosen on one half of the unknown people, applied to the other).
    unknown_far: number(0.0, 1.0, low_open=True, high_open=True) = 0.05
    n_bins: integer(1)
    batch_size: integer(1)
    num_threads: integer(0)
    embedding_plot: flag()
    members: MembersConfig
    verification: VerificationConfig
