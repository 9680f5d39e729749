"""``model.init_from`` in the train stage (issue 25, part 6): the backbone starts from the published
file's tensors, the heads from the same random centres as without it; a file that does not fit
stops the stage with one line naming the key ``model.init_from.path``, the file and the bad key."""

from __future__ import annotations

import torch
from pipeline_testing import paths_in, tiny_raw, write_params

from angular.config import parse_params
from angular.data import read_manifest
from angular.nn.backbones import build_backbone
from angular.nn.published import insightface_state_dict
from angular.train.loop import set_up
from pipeline import EXIT_CONFIG, run_stage
from pipeline import train as train_stage

# The published format: 3-channel 112x112 faces to 512-d embeddings (digits resized to it).
PUBLISHED = dict(
    model__backbone="iresnet18",
    model__embedding_dim=512,
    data__channels=3,
    data__image_size=[112, 112],
    train__epochs=1,
)


def published_file(folder, seed=0):
    source = build_backbone("iresnet18", in_channels=3, embedding_dim=512, input_size=(112, 112))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in source.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    path = folder / "backbone.pth"
    torch.save(insightface_state_dict(source), path)
    return source.state_dict(), path


def test_the_train_stage_starts_the_backbone_from_the_file(project):
    expected, path = published_file(project)
    manifest = read_manifest("data/prepared")
    plain = set_up(
        parse_params(tiny_raw(**PUBLISHED)), "arcface", manifest, paths_in(project / "a")
    )
    raw = tiny_raw(**PUBLISHED)
    raw["model"]["init_from"] = {"format": "insightface", "path": str(path)}
    session = set_up(parse_params(raw), "arcface", manifest, paths_in(project / "b"))
    for key, tensor in session.model.backbone.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    # The heads start as they would without the file (loading draws no random numbers).
    for key, tensor in session.model.heads.state_dict().items():
        assert torch.equal(tensor, plain.model.heads.state_dict()[key]), key


def test_a_file_that_does_not_fit_stops_the_stage_with_one_line(project, capsys):
    expected, path = published_file(project)
    state = torch.load(path, weights_only=True)
    state["layer2.0.conv1.weight"] = torch.randn(128, 64, 1, 1)
    torch.save(state, path)
    raw = tiny_raw(**PUBLISHED)
    raw["model"]["init_from"] = {"format": "insightface", "path": "backbone.pth"}
    write_params(project, raw)
    assert run_stage(train_stage.main, ["arcface"]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err == (
        "error in params.yaml: model.init_from.path: backbone.pth: layer2.0.conv1.weight has shape "
        "[128, 64, 1, 1], the model's has [128, 64, 3, 3] (published IResNets take 3-channel "
        "112x112 images to 512-d embeddings)"
    )
