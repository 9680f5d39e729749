"""The evaluate stage's library with verification sets (``evaluate.verification.bins``): each
item's and the ensemble's bin_metrics, under ``bins/<set>``, in the report and MLflow's flat
names; without sets no ``bins`` key; the configured FARs reach the drawn pairs' TARs too."""

from __future__ import annotations

import numpy as np
from pipeline_testing import shipped_raw

from angular.config import parse_params
from angular.eval.bins import bin_metrics, flip_embeddings
from angular.eval.evaluate import evaluate_models, json_ready
from angular.eval.report import flat_metrics, report_table
from angular.serve.inference import SplitOutputs

FARS = [1e-4, 1e-2, 1e-1]


def evaluate_config(**verification):
    raw = shipped_raw()
    raw["evaluate"]["embedding_plot"] = False
    raw["evaluate"]["members"]["rule"] = "none"  # both items in the ensemble
    raw["evaluate"]["verification"].update(verification)
    return parse_params(raw).evaluate


def split_outputs(rng, labels, identities, members, dim=6, classes=4) -> SplitOutputs:
    return SplitOutputs(
        embeddings=rng.normal(size=(len(labels), dim)).astype(np.float32),
        logits={m: rng.normal(size=(len(labels), classes)).astype(np.float32) for m in members},
        labels=np.asarray(labels, dtype=np.int64),
        identities=list(identities),
    )


def model_outputs(rng):
    """Two items (one head each) on val, test and unknown images of 4 known, 3 unknown people."""
    known = np.repeat(np.arange(4), 6)
    unknown_people = np.repeat(np.arange(3), 6)
    outputs = {}
    for item, member in (("item_a", "arcface"), ("item_b", "cosface")):
        outputs[item] = {
            split: split_outputs(rng, known, [f"p{k}" for k in known], [member])
            for split in ("val", "test")
        }
        outputs[item]["unknown"] = split_outputs(
            rng, -np.ones(len(unknown_people)), [f"u{k}" for k in unknown_people], [member]
        )
    temperatures = {"item_a": {"arcface": 1.0}, "item_b": {"cosface": 1.5}}
    return outputs, temperatures


def random_bin(rng, n_pairs, dim=6):
    same = rng.random(n_pairs) < 0.5
    same[:2] = [True, False]
    return same, rng.normal(size=(2 * n_pairs, dim)), rng.normal(size=(2 * n_pairs, dim))


def test_sets_are_scored_per_item_and_ensemble(tmp_path):
    rng = np.random.default_rng(0)
    outputs, temperatures = model_outputs(rng)
    config = evaluate_config(bins=["x/lfw.bin", "cfp_fp.bin"], fars=FARS)
    lfw_a, lfw_b = random_bin(rng, 40), random_bin(rng, 40)
    lfw_b = (lfw_a[0], *lfw_b[1:])  # one set: the same pairs for every item
    cfp_a, cfp_b = random_bin(rng, 30), random_bin(rng, 30)
    cfp_b = (cfp_a[0], *cfp_b[1:])
    bins = {"item_a": {"lfw": lfw_a, "cfp_fp": cfp_a}, "item_b": {"lfw": lfw_b, "cfp_fp": cfp_b}}
    results = evaluate_models(outputs, temperatures, list("abcd"), config, tmp_path, bins=bins)
    assert list(results["bins"]) == ["lfw", "cfp_fp"]
    for stem, (a, b) in (("lfw", (lfw_a, lfw_b)), ("cfp_fp", (cfp_a, cfp_b))):
        entries = results["bins"][stem]
        assert list(entries) == ["item_a", "item_b", "ensemble"]
        for item, (same, embeddings, flipped) in (("item_a", a), ("item_b", b)):
            expected = json_ready(bin_metrics(embeddings, flipped, same, FARS, 10))
            assert entries[item] == expected
            assert expected["tar@far=1e-4"] is None and expected["tar@far=1e-1"] is not None
        ensemble = np.concatenate([flip_embeddings(*a[1:]), flip_embeddings(*b[1:])], axis=1)
        assert entries["ensemble"] == json_ready(bin_metrics(ensemble, None, a[0], FARS, 10))
    # The configured FARs are also those of the drawn pairs (and their thresholds).
    drawn = results["verification"]["test"]["item_a"]
    assert [k for k in drawn if k.startswith("tar@")] == [
        f"tar@far={f}" for f in ("1e-4", "1e-2", "1e-1")
    ]
    assert "threshold@far=1e-4" in drawn
    table = report_table(results)
    assert "Verification set lfw (insightface's protocol, flip test):" in table
    assert (
        "| accuracy | accuracy_std | auc | eer | tar@far=1e-4 | tar@far=1e-2 | tar@far=1e-1 |"
        in table
    )
    assert "| accuracy | auc | eer | tar@far=1e-4 |" in table  # the drawn pairs' tables as before
    flat = flat_metrics(results)
    assert (
        flat["bins/cfp_fp/ensemble/accuracy"] == results["bins"]["cfp_fp"]["ensemble"]["accuracy"]
    )
    assert "bins/lfw/item_a/tar@far=1e-4" not in flat  # nulls are left out


def test_without_sets_no_bins_key(tmp_path):
    rng = np.random.default_rng(1)
    outputs, temperatures = model_outputs(rng)
    config = evaluate_config()
    for bins in (None, {"item_a": {}, "item_b": {}}):
        results = evaluate_models(outputs, temperatures, list("abcd"), config, tmp_path, bins=bins)
        assert "bins" not in results
        assert "Verification set" not in report_table(results)
        drawn = results["verification"]["test"]["item_a"]
        assert [k for k in drawn if k.startswith("tar@")] == [
            "tar@far=1e-1",
            "tar@far=1e-2",
            "tar@far=1e-3",
        ]
