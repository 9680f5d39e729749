"""``model.init_from`` (issue 25, part 6): the published weights the training stage's backbone starts
from. Absent or null: random weights, as before. A file that does not fit is a ConfigError of
``model.init_from.path``, one line naming the file and the first bad key.
"""

from __future__ import annotations

import pytest
import torch
from pipeline_testing import set_key, shipped_raw

from angular.config import ConfigError, parse_params
from angular.nn.backbones import build_backbone
from angular.nn.published import insightface_state_dict


def params_with(init_from, backbone="iresnet18"):
    raw = shipped_raw()
    set_key(raw, "model.backbone", backbone)
    set_key(raw, "data.image_size", [112, 112])
    raw["model"]["init_from"] = init_from
    return parse_params(raw)


def test_absent_or_null_is_random_weights():
    raw = shipped_raw()
    raw["model"].pop("init_from", None)
    assert parse_params(raw).model.init_from is None
    assert params_with(None).model.init_from is None


@pytest.mark.parametrize("depth", [18, 34, 50, 100, 200])
def test_a_published_file_is_accepted_for_every_iresnet(depth):
    init_from = params_with(
        {"format": "insightface", "path": "weights/backbone.pth"}, f"iresnet{depth}"
    ).model.init_from
    assert (init_from.format, init_from.path) == ("insightface", "weights/backbone.pth")


@pytest.mark.parametrize(
    "value, backbone, key, problem",
    [
        ("backbone.pth", "iresnet50", "model.init_from", "must be a mapping"),
        (
            {"format": "onnx", "path": "b.pth"},
            "iresnet50",
            "model.init_from.format",
            "one of insightface",
        ),
        ({"format": "insightface"}, "iresnet50", "model.init_from.path", "missing"),
        ({"format": "insightface", "path": ""}, "iresnet50", "model.init_from.path", "non-empty"),
        (
            {"format": "insightface", "path": "b.pth", "head": "m.pt"},
            "iresnet50",
            "model.init_from.head",
            "unknown key",
        ),
        (
            {"format": "insightface", "path": "b.pth"},
            "mobilefacenet",
            "model.init_from",
            "model.backbone must be an iresnet, got mobilefacenet",
        ),
        (
            {"format": "insightface", "path": "b.pth"},
            "small_cnn",
            "model.init_from",
            "must be an iresnet",
        ),
    ],
)
def test_bad_values_name_the_key(value, backbone, key, problem):
    with pytest.raises(ConfigError) as caught:
        params_with(value, backbone)
    assert caught.value.key == key
    assert problem in caught.value.problem


def test_load_into_copies_the_file_into_the_backbone(tmp_path):
    source = build_backbone("iresnet18", in_channels=3, embedding_dim=512, input_size=(112, 112))
    with torch.no_grad():
        for tensor in source.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_()
    torch.save(insightface_state_dict(source), tmp_path / "backbone.pth")
    target = build_backbone("iresnet18", in_channels=3, embedding_dim=512, input_size=(112, 112))
    init_from = params_with({"format": "insightface", "path": str(tmp_path / "backbone.pth")})
    init_from.model.init_from.load_into(target)
    expected = source.state_dict()
    for key, tensor in target.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


def test_a_file_that_does_not_fit_is_a_config_error_of_the_path(tmp_path):
    small = build_backbone("iresnet18", in_channels=3, embedding_dim=512, input_size=(112, 112))
    state = insightface_state_dict(small)
    del state["bn2.running_mean"]
    torch.save(state, tmp_path / "backbone.pth")
    init_from = params_with({"format": "insightface", "path": str(tmp_path / "backbone.pth")})
    with pytest.raises(ConfigError) as caught:
        init_from.model.init_from.load_into(small)
    assert caught.value.key == "model.init_from.path"
    assert (
        caught.value.problem
        == f"{tmp_path / 'backbone.pth'}: missing key bn2.running_mean (the file's first key is conv1.weight)"
    )
    with pytest.raises(
        ConfigError, match=r"^model\.init_from\.path: .*absent\.pth: no such weights file$"
    ):
        params_with(
            {"format": "insightface", "path": str(tmp_path / "absent.pth")}
        ).model.init_from.load_into(small)
