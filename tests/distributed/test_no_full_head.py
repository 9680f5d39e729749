"""No rank holds the C x D head on several processes (issue 28, part 7): the ranks validate on
their shards, and a head over ``train.distributed.gather_head_mib`` is saved as its shards in the
one model file, which every reader joins.

- Validation: W = 2 and 3 gloo processes validate a model (centres moved off their random
  start, BatchNorm statistics that differ by rank) on uneven batches, and every rank's history
  row equals the one-process row of the same model within 1e-5 (relative): loss, accuracy over
  all C classes, spread, centre cosine; for a sampled head, a joint item, sub-centres and adaptive
  heads.
- The model file: one W = 2 run trains twice, its heads gathered (the default) and saved as
  shards (``gather_head_mib: 0``), with verification by step writing the best model file too.
  The sharded run never calls ``full_weight`` nor ``gather_heads`` on any rank; both runs give the
  same metrics, and their model files load, predict and export the same; the final row equals the
  one-process validation of the loaded model.
- A damaged sharded file is refused by ``load_model`` with one line naming the problem.
"""

from __future__ import annotations

import collections
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from distributed_testing import spawn
from pipeline_testing import paths_in, tiny_raw
from torch.utils.data import DataLoader
from verification_testing import synthetic_bin

from angular.config import parse_params
from angular.data import read_manifest
from angular.nn import heads as heads_module
from angular.nn.recognition import build_model, load_model, model_document
from angular.nn.sharded import ShardedMarginHead
from angular.train import loop
from angular.train.epoch import blocks, validate
from angular.train.world import ONE_PROCESS, ProcessGroup

RELATIVE = 1e-5
VAL_BATCH = 37  # uneven blocks: 37 rows on 2 or 3 ranks, and a short last batch

# (item, overrides) of the validation cases.
CASES = {
    2: [
        ("arcface", {"train__distributed__sample_rate": 0.5}),
        ("arcface", {"heads__arcface__fused_linear": True}),  # the fused linear op in shard mode
        ("joint", {}),
        ("subcenter_arcface", {}),
        ("magface", {}),
    ],
    3: [("arcface", {}), ("curricularface", {}), ("adaface", {})],
}


def case_raw(item: str, world_size: int, overrides: dict) -> dict:
    return tiny_raw(
        train__items=[item],
        train__batch_size=96,
        train__distributed__world_size=world_size,
        train__distributed__backend="gloo",
        **overrides,
    )


@torch.no_grad()
def prepared_session(raw: dict, item: str, prepared: Path, folder: Path):
    """The one-process session of ``raw`` on a validation loader of ``VAL_BATCH`` rows, its
    BatchNorm statistics moved and its centres set near the class means of the validation
    embeddings (an accuracy well above chance), drawn together (a centre cosine well off 0)."""
    params = parse_params(raw)
    manifest = read_manifest(prepared)
    session = loop.set_up(params, item, manifest, paths_in(folder))
    model = session.model
    generator = torch.Generator().manual_seed(5)
    for buffer in model.backbone.buffers():
        if buffer.is_floating_point():
            buffer.add_(0.2 * torch.rand(buffer.shape, generator=generator))
    session.val_loader = DataLoader(session.val_loader.dataset, batch_size=VAL_BATCH)
    model.eval()
    pairs = [(model(images), labels) for images, labels in session.val_loader]
    embeddings, labels = torch.cat([e for e, _ in pairs]), torch.cat([y for _, y in pairs])
    for head in model.heads.values():
        rows = head.weight.view(head.num_classes, -1, head.weight.shape[1])
        direction = torch.randn(rows.shape[2], generator=generator)
        for label in labels.unique():
            mean = F.normalize(embeddings[labels == label].mean(0), dim=0)
            noise = torch.randn(rows[label].shape, generator=generator)
            rows[label] = mean + 0.2 * noise / rows.shape[2] ** 0.5
        head.weight.add_(0.3 * direction / direction.norm())
    model.train()
    return params, manifest, session


def row_of_one_process(raw: dict, item: str, prepared: Path, folder: Path) -> dict:
    _, _, session = prepared_session(raw, item, prepared, folder)
    return validate(session, ONE_PROCESS, 1, 0.1, 1.0, {name: 0.5 for name in session.item.heads})


def validation_worker(rank: int, world_size: int, cases, prepared: Path, folder: Path):
    """Each case's history row on this rank, and the calls that would gather a head."""
    calls = spy_on_gathering()
    rows = []
    for item, raw in cases:
        params, manifest, session = prepared_session(raw, item, prepared, folder / f"rank-{rank}")
        world = ProcessGroup(torch.device("cpu"))
        session = loop.spread_over(session, params, params.item(item), manifest, world)
        if rank > 0:  # its own BatchNorm statistics, as after a step on its share of a batch
            with torch.no_grad():
                for buffer in session.model.backbone.buffers():
                    if buffer.is_floating_point():
                        buffer.mul_(1.5)
        heads = {name: 0.5 for name in session.model.heads}
        rows.append(validate(session, world, 1, 0.1, 1.0, heads))
    return rows, dict(calls)


def spy_on_gathering() -> collections.Counter:
    """Count the calls of ``full_weight`` and ``gather_heads`` in this process from now on."""
    calls = collections.Counter()

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    ShardedMarginHead.full_weight = counted("full_weight", ShardedMarginHead.full_weight)
    ProcessGroup.gather_heads = counted("gather_heads", ProcessGroup.gather_heads)
    return calls


def assert_rows_close(row: dict, expected: dict, what: str) -> None:
    assert row.keys() == expected.keys(), what
    for key, value in expected.items():
        assert math.isclose(row[key], value, rel_tol=RELATIVE, abs_tol=1e-7), (
            f"{what}: {key} {row[key]!r} != {value!r}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_validates_on_its_shards_to_the_one_process_row(
    world_size, digits_prepared, tmp_path
):
    cases = [(item, case_raw(item, world_size, over)) for item, over in CASES[world_size]]
    expected = [row_of_one_process(raw, item, digits_prepared, tmp_path) for item, raw in cases]
    results = spawn(validation_worker, world_size, tmp_path, cases, digits_prepared, tmp_path)
    for rank, (rows, calls) in enumerate(results):
        assert calls == {}, f"rank {rank} gathered a head to validate: {calls}"
        for (item, _), row, one in zip(cases, rows, expected):
            assert_rows_close(row, one, f"{item} on rank {rank} of {world_size}")
    # The checks can fail: the centres were drawn together, the centres classify.
    assert all(one["centre_cosine"] > 0.05 for one in expected)
    assert all(one["val_accuracy"] > 0.2 for one in expected)  # chance: 0.1


@pytest.mark.parametrize(("count", "batch", "world_size"), [(80, 37, 3), (7, 4, 3), (5, 10, 2)])
def test_the_ranks_blocks_cover_each_batch_once_in_order(count, batch, world_size):
    plans = [blocks(count, batch, world_size, rank) for rank in range(world_size)]
    assert len({len(plan) for plan in plans}) == 1  # as many batches on every rank
    for number, entries in enumerate(zip(*plans)):
        size = min(batch, count - number * batch)
        assert {entry[1] for entry in entries} == {size}
        share = -(-size // world_size)
        real = [index for indices, _, kept in entries for index in indices[:kept]]
        assert real == list(range(number * batch, number * batch + size))
        assert all(0 < len(indices) <= share for indices, _, _ in entries)


# --------------------------------------------------------------------------------------------------
# The model file.


def training_worker(rank: int, world_size: int, raw: dict, prepared: Path, folder: Path):
    calls = spy_on_gathering()
    drawn = calls["centre rows drawn"] = []  # the rows of every head's initial centres kept
    draw = heads_module.draw_centres

    def recording(num_classes, per_class, dim):
        weight, kept = draw(num_classes, per_class, dim)
        drawn.append((num_classes, weight.shape[0]))
        return weight, kept

    heads_module.draw_centres = recording
    params = parse_params(raw)
    manifest = read_manifest(prepared)
    paths = paths_in(folder)
    paths = type(paths)(**{**vars(paths), "best_model": folder / "best.pt"})
    world = ProcessGroup(torch.device("cpu"))
    metrics = loop.train_item(params, "arcface", manifest, paths, world=world)
    return metrics, dict(calls)


@pytest.fixture(scope="module")
def two_runs(digits_prepared, tmp_path_factory):
    """One W = 2 run trained twice: its heads gathered, and saved as shards."""
    folder = tmp_path_factory.mktemp("no_full_head")
    raw = tiny_raw(
        train__epochs=2,
        train__distributed__world_size=2,
        train__distributed__backend="gloo",
    )
    raw["train"]["verification"] = {
        "bins": [str(synthetic_bin(folder / "synthetic.bin"))],
        "every_steps": 6,
    }
    runs = {}
    for name, mib in (("gathered", 1024.0), ("sharded", 0.0)):
        run_raw = copy.deepcopy(raw)
        run_raw["train"]["distributed"]["gather_head_mib"] = mib
        out = folder / name
        out.mkdir()
        runs[name] = (out, spawn(training_worker, 2, folder, run_raw, digits_prepared, out))
    return raw, runs


@pytest.mark.slow
def test_a_head_over_the_size_is_never_gathered_and_saved_as_shards(two_runs):
    _, runs = two_runs
    folder, results = runs["sharded"]
    classes = len(torch.load(folder / "model.pt", weights_only=True)["classes"])
    for rank, (_, calls) in enumerate(results):
        # Set-up kept only the rank's shard of the run's head's initial centres (the one-process
        # draws); the other draws are the config checks' one-class heads.
        drawn = [rows for count, rows in calls.pop("centre rows drawn") if count == classes]
        assert drawn == [classes // 2 + (rank < classes % 2)], (rank, drawn)
        assert calls == {}, f"rank {rank} gathered a head: {calls}"
    # The spies see the gathering and the whole centres when there are.
    assert all(calls["gather_heads"] >= 1 for _, calls in runs["gathered"][1])
    for _, calls in runs["gathered"][1]:
        assert [rows for count, rows in calls["centre rows drawn"] if count == classes] == [classes]
    assert sorted(path.name for path in folder.iterdir() if path.is_file()) == [
        "accuracy.tsv",
        "best.pt",
        "collapse.tsv",
        "loss.tsv",
        "metrics.json",
        "model.pt",
    ]  # one model file each, no shard file left
    for name in ("model.pt", "best.pt"):
        document = torch.load(folder / name, weights_only=True)
        assert document["version"] == 2
        assert "heads.arcface.weight" not in document["state_dict"]
        entry = document["head_shards"]["arcface"]
        classes = len(document["classes"])
        assert entry["class_ranges"] == [
            [0, classes - classes // 2],
            [classes - classes // 2, classes],
        ]
        assert [tuple(shard.shape) for shard in entry["shards"]] == [
            (stop - start, 16) for start, stop in entry["class_ranges"]
        ]
    gathered = torch.load(runs["gathered"][0] / "model.pt", weights_only=True)
    assert gathered["version"] == 1 and "head_shards" not in gathered


@pytest.mark.slow
def test_both_files_load_predict_and_export_alike(two_runs, digits_prepared, tmp_path):
    from angular.serve.export import export_onnx, load_onnx
    from angular.serve.predict import load_predictor

    _, runs = two_runs
    gathered, sharded = runs["gathered"], runs["sharded"]
    assert gathered[1][0][0] == sharded[1][0][0]  # the same metrics (rank 0's), to the bit
    assert sharded[1][1][0] == sharded[1][0][0]  # on every rank
    for name in ("model.pt", "best.pt"):
        one, other = load_model(gathered[0] / name), load_model(sharded[0] / name)
        first, second = one.model.state_dict(), other.model.state_dict()
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), key
        assert (one.classes, one.training) == (other.classes, other.training)

    manifest = read_manifest(digits_prepared)
    images = [digits_prepared / path for path in manifest.paths("test")[::9][:20]]
    predictions = []
    for run in (gathered, sharded):
        predictor = load_predictor(model_paths=[run[0] / "model.pt"], threshold=0.0)
        predictions.append([prediction.to_dict() for prediction in predictor.predict(images)])
    assert predictions[0] == predictions[1]
    assert len({p["identity"] for p in predictions[0]}) > 1  # a model that tells digits apart
    exported = [
        export_onnx(
            run[0] / "model.pt", tmp_path / f"{name}.onnx", probabilities=True, temperature=1.0
        )
        for name, run in runs.items()
    ]
    onnx_models = [load_onnx(path) for path in exported]
    assert onnx_models[0].fingerprint == onnx_models[1].fingerprint
    image = onnx_models[0].image
    batch = torch.rand(
        5, image["channels"], *image["size"], generator=torch.Generator().manual_seed(1)
    )
    (embeddings, probabilities), (other_embeddings, other_probabilities) = (
        model.run(batch.numpy()) for model in onnx_models
    )
    assert (embeddings == other_embeddings).all() and (probabilities == other_probabilities).all()


@pytest.mark.slow
def test_the_last_row_is_the_one_process_validation_of_the_saved_model(
    two_runs, digits_prepared, tmp_path
):
    raw, runs = two_runs
    folder = runs["sharded"][0]
    metrics = json.loads((folder / "metrics.json").read_text())
    # One process, the same params (its label smoothing), the saved model's weights.
    params = parse_params(raw)
    session = loop.set_up(params, "arcface", read_manifest(digits_prepared), paths_in(tmp_path))
    session.model.load_state_dict(load_model(folder / "model.pt").model.state_dict())
    row = validate(session, ONE_PROCESS, 2, 0.0, 0.0, {"arcface": 0.0})
    for key in ("val_loss", "val_accuracy", "embedding_spread", "centre_cosine"):
        assert math.isclose(metrics[key], row[key], rel_tol=RELATIVE, abs_tol=1e-7), key
    assert metrics["val_accuracy"] > 0.5  # trained: the row is no chance-level constant


# --------------------------------------------------------------------------------------------------
# Reading a sharded file: one line for a damaged one.

CLASSES = 10


def sharded_file(folder: Path, damage=None) -> tuple[Path, torch.nn.Module]:
    """A sharded model file of a tiny untrained ArcFace model of 10 classes (shards of 6 and 4),
    ``damage(document)`` applied; the model it holds."""
    params = parse_params(tiny_raw())
    backbone, heads, image = loop.describe_model(params, params.item("arcface"))
    model = build_model(backbone, heads, CLASSES)
    state = model.state_dict()
    weight = state.pop("heads.arcface.weight")
    document = model_document(
        state,
        item="arcface",
        backbone=backbone,
        heads=heads,
        classes=[str(index) for index in range(CLASSES)],
        image=image,
        training={},
        head_shards={
            "arcface": {
                "centres_per_class": 1,
                "class_ranges": [[0, 6], [6, CLASSES]],
                "shards": [weight[:6].clone(), weight[6:].clone()],
            }
        },
    )
    if damage is not None:
        damage(document)
    path = folder / "model.pt"
    torch.save(document, path)
    return path, model


def test_a_sharded_file_loads_as_its_full_model(tmp_path):
    path, model = sharded_file(tmp_path)
    loaded = load_model(path).model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key


def entry(document) -> dict:
    return document["head_shards"]["arcface"]


DAMAGES = {
    "gap": (
        lambda d: entry(d).update(class_ranges=[[0, 5], [6, CLASSES]]),
        "head 'arcface': shard 0 (classes [0, 5)) has shape (6, 16), expected (5, 16)",
    ),
    "order": (
        lambda d: entry(d).update(
            class_ranges=[[6, CLASSES], [0, 6]], shards=entry(d)["shards"][::-1]
        ),
        "shard 0's class range [6, 10] does not start where the previous one stopped (0)",
    ),
    "missing": (
        lambda d: entry(d).update(class_ranges=[[0, 6]], shards=entry(d)["shards"][:1]),
        "the shards cover classes [0, 6) of the head's 10",
    ),
    "count": (
        lambda d: entry(d).update(shards=entry(d)["shards"][:1]),
        "2 class ranges for 1 shards",
    ),
    "shape": (
        lambda d: entry(d)["shards"].__setitem__(1, torch.zeros(4, 15)),
        "shard 1 (classes [6, 10)) has shape (4, 15), expected (4, 16)",
    ),
    "sub-centres": (
        lambda d: entry(d).update(centres_per_class=2),
        "centres_per_class 2 does not fit the head (10 centres for 10 classes)",
    ),
    "both": (
        lambda d: d["state_dict"].__setitem__("heads.arcface.weight", torch.zeros(CLASSES, 16)),
        "head 'arcface' is saved both whole (heads.arcface.weight) and as shards",
    ),
    "unknown head": (
        lambda d: d["head_shards"].__setitem__("cosface", d["head_shards"].pop("arcface")),
        "head_shards names 'cosface', which is not a head of the model",
    ),
    "version 1": (
        lambda d: d.update(version=1),
        "a version 1 model file with head_shards",
    ),
    "no shards": (lambda d: d.pop("head_shards"), "version 2 needs a non-empty head_shards dict"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_a_damaged_sharded_file_is_one_line_naming_the_problem(tmp_path, damage):
    change, expected = DAMAGES[damage]
    path, _ = sharded_file(tmp_path, change)
    with pytest.raises(ValueError) as caught:
        load_model(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert expected in message, message
