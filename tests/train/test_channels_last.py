"""``train.channels_last``: the conv backbone trains in NHWC (faster on CPU, BENCHMARKS.md "Face
backbones on CPU") and gives the model the default NCHW run gives, up to rounding."""

from __future__ import annotations

import torch
from pipeline_testing import model_state, paths_in, tiny_raw

from angular.config import parse_params
from angular.data import read_manifest
from angular.nn.recognition import load_model
from angular.train.loop import train_item


def test_channels_last_trains_the_same_model_as_nchw(project):
    manifest = read_manifest("data/prepared")
    states = {}
    for channels_last in (False, True):
        params = parse_params(tiny_raw(train__epochs=1, train__channels_last=channels_last))
        paths = paths_in(project / f"out-{channels_last}")
        train_item(params, "arcface", manifest, paths)
        states[channels_last] = model_state(paths.model)
        loaded = load_model(paths.model)  # an NHWC-trained file loads into the plain model
        assert loaded.model(torch.randn(2, 1, 8, 8)).shape == (2, params.model.embedding_dim)
    assert states[True].keys() == states[False].keys()
    for name, value in states[False].items():
        if value.is_floating_point():
            torch.testing.assert_close(states[True][name], value, rtol=1e-3, atol=1e-4, msg=name)
    # The option took effect: the NHWC run's conv weights (more than one input plane) kept NHWC.
    convs = [k for k, v in states[True].items() if v.dim() == 4 and v.shape[1] > 1]
    assert convs and all(
        states[True][k].is_contiguous(memory_format=torch.channels_last)
        and not states[False][k].is_contiguous(memory_format=torch.channels_last)
        for k in convs
    )
