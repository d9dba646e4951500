"""Optimiser groups and schedules."""

import numpy as np
import pytest

from tec_model.optim import lr_schedule, param_groups, scaled_lr
from tests.fixtures.models import make_base, make_tec


def test_no_decay_on_biases_and_1d_params():
    model = make_tec(make_base())
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    assert all(p is not model.encoder.pos_embed for p in decay["params"] + no_decay["params"])


def test_warmup_then_cosine():
    lr = lr_schedule(1.0, total_steps=100, warmup_steps=10, min_lr=0.1)
    assert lr[0] == 0.0 and lr[5] == pytest.approx(0.5) and lr[10] == pytest.approx(1.0)
    assert np.all(np.diff(lr[:11]) > 0) and np.all(np.diff(lr[10:]) <= 0)
    assert lr[-1] == pytest.approx(0.1, abs=1e-3)
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
