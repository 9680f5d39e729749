"""The head registry (angular/nn/registry.py): each head type registered once, with its options;
PRESETS, ADAPTIVE_HEADS and the sharded head's rule follow from the classes."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from angular.nn import (
    ADAPTIVE_HEADS,
    HEADS,
    PRESETS,
    AdaFace,
    ElasticArcFace,
    LambdaSchedule,
    MarginSpec,
    ShardedMarginHead,
    SphereFace,
    SubCenterArcFace,
)
from angular.nn.registry import Group, Number, Option, register_head

ROOT = Path(__file__).resolve().parents[2]


def test_every_head_type_is_registered_once_presets_first():
    assert list(HEADS) == [
        "arcface",
        "cosface",
        "sphereface",
        "combined",
        "adaface",
        "elasticface_arc",
        "elasticface_cos",
        "magface",
        "curricularface",
        "subcenter_arcface",
    ]
    assert PRESETS == {name: head.cls for name, head in HEADS.items() if not head.adaptive}
    assert ADAPTIVE_HEADS == {name: head.cls for name, head in HEADS.items() if head.adaptive}
    for name, head in HEADS.items():
        assert head.cls.type_name == name


@pytest.mark.parametrize("name", list(HEADS))
def test_registered_defaults_are_the_constructor_defaults(name):
    head = HEADS[name]
    parameters = inspect.signature(head.cls).parameters
    assert parameters["s"].default == 64.0
    for option in head.options:
        if isinstance(option.rule, Group):  # SphereFace's lam: its schedule's defaults
            assert parameters["schedule"].default is None
            defaults = {o.name: o.default for o in option.rule.options}
            assert LambdaSchedule(*defaults.values()) == LambdaSchedule()
        else:
            assert parameters[option.name].default == option.default, option.name


@pytest.mark.parametrize("name", list(HEADS))
def test_the_registered_margin_is_the_heads_margin(name):
    head = HEADS[name]
    options = {
        option.name: (
            {o.name: o.default for o in option.rule.options}
            if isinstance(option.rule, Group)
            else option.default
        )
        for option in head.options
    }
    built = head.cls(4, 3)
    assert head.margin(64.0, options) == built.margin
    assert isinstance(built.margin, MarginSpec)
    if head.adaptive:
        assert built.options == options


def test_a_type_registered_twice_is_refused():
    with pytest.raises(ValueError, match="'arcface' is registered twice"):
        register_head("arcface", options=(Option("m", 0.5, Number(low=0.0)),), formula="x")(
            type("Again", (), {})
        )


@pytest.mark.parametrize(
    "make",
    [
        lambda: AdaFace(6, 5),
        lambda: ElasticArcFace(6, 5, plus=True, seed=3),
        lambda: SubCenterArcFace(6, 5, k=2),
    ],
)
def test_an_adaptive_shards_rule_is_its_head_without_centres(make):
    torch.manual_seed(0)
    head = make()
    head.train()
    head.loss(torch.randn(4, 6) * 30, torch.tensor([0, 1, 2, -1]))  # its state moves on
    before = torch.get_rng_state()
    rule = head.margin_rule()
    assert torch.equal(torch.get_rng_state(), before)  # no draw from torch's generator
    assert type(rule) is type(head) and rule.weight is None
    assert rule.options == head.options and rule.margin == head.margin
    assert not rule.sync_statistics
    state, own = rule.state_dict(), head.state_dict()
    assert list(state) == [key for key in own if key != "weight"]
    for key, value in state.items():
        assert torch.equal(value, own[key]), key
    shard = ShardedMarginHead.from_head(head)
    assert list(shard.state_dict()) == ["weight", "step", *(f"rule.{key}" for key in state)]


def test_a_margin_head_without_centres_draws_nothing():
    before = torch.get_rng_state()
    head = SphereFace(8, 100, centres=False)
    assert head.weight is None and list(head.state_dict()) == ["step"]
    assert torch.equal(torch.get_rng_state(), before)


NEW_HEAD = """
import json

from angular.nn.heads import MarginHead, MarginSpec
from angular.nn.registry import Number, Option, register_head


@register_head(
    "halfarc", options=(Option("m", 0.25, Number(low=0.0, high=1.0)),), formula="cos(theta + m/2)."
)
class HalfArc(MarginHead):
    def __init__(self, embedding_dim, num_classes, s=64.0, m=0.25, **kw):
        super().__init__(embedding_dim, num_classes, MarginSpec.arcface(s, m / 2), **kw)

    @classmethod
    def margin_spec(cls, s, options):
        return MarginSpec.arcface(s, options["m"] / 2)


from angular.config import HEAD_TYPES, ConfigError, parse_params, params_schema, read_yaml

schema = json.loads(params_schema())
print(HEAD_TYPES[-1])
print(json.dumps(schema["$defs"]["HalfArcHead"], sort_keys=True))
raw = read_yaml(open("params.yaml", encoding="utf-8").read())
raw["heads"] = {"h": {"type": "halfarc", "s": 30.0, "m": 0.5}}
raw["train"]["items"] = ["h"]
print(parse_params(raw).heads["h"].heads["h"].margin == MarginSpec.arcface(30.0, 0.25))
raw["heads"]["h"]["m"] = 2
try:
    parse_params(raw)
except ConfigError as error:
    print(error)
"""


def test_a_head_registered_in_one_place_appears_in_the_config_and_its_schema():
    done = subprocess.run(
        [sys.executable, "-c", NEW_HEAD],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    last, model, margin, error = done.stdout.splitlines()
    assert last == "halfarc"
    assert json.loads(model) == {
        "additionalProperties": False,
        "description": "cos(theta + m/2).",
        "properties": {
            "type": {"const": "halfarc", "type": "string"},
            "s": {"exclusiveMinimum": 0.0, "type": "number"},
            "straight_through": {"default": False, "type": "boolean"},
            "fused_linear": {"anyOf": [{"type": "boolean"}, {"type": "null"}], "default": None},
            "m": {"maximum": 1.0, "minimum": 0.0, "type": "number"},
        },
        "required": ["type", "s", "m"],
        "title": "HalfArcHead",
        "type": "object",
    }
    assert margin == "True"
    assert error == "heads.h.m: must be a number in [0, 1], got 2"
