"""Balancing losses against hand-computed values."""

import math

import numpy as np
import pytest
from keras import ops

from dl_moe.losses import (
    coefficient_of_variation_squared,
    importance_loss,
    load_balancing_loss,
    router_entropy_loss,
    router_z_loss,
)


def value(x):
    return float(ops.convert_to_numpy(x))


def t(x, dtype=None):
    return ops.convert_to_tensor(np.asarray(x), dtype=dtype)


def test_importance_loss_hand_computed():
    weights = t([[0.6, 0.4], [0.5, 0.5], [1.0, 0.0]], "float32")
    indices = t([[0, 1], [0, 2], [3, 0]], "int32")
    # importance = [0.6 + 0.5 + 0.0, 0.4, 0.5, 1.0] = [1.1, 0.4, 0.5, 1.0]; mean 0.75
    # variance = (0.35^2 + 0.35^2 + 0.25^2 + 0.25^2) / 4 = 0.09250; CV^2 = 0.0925 / 0.5625
    assert value(importance_loss(weights, indices, 4)) == pytest.approx(0.0925 / 0.5625, rel=1e-5)
    # Masking the last token removes its weight: importance = [1.1, 0.4, 0.5, 0].
    masked = importance_loss(weights, indices, 4, t([1, 1, 0], "float32"))
    imp = np.array([1.1, 0.4, 0.5, 0.0])
    assert value(masked) == pytest.approx(imp.var() / imp.mean() ** 2, rel=1e-5)
    # Equal importance scores 0.
    assert value(importance_loss(t(np.ones((4, 1)), "float32"), t(np.arange(4).reshape(4, 1), "int32"), 4)) == pytest.approx(0.0)


def test_coefficient_of_variation_squared():
    assert value(coefficient_of_variation_squared(t([1.0, 3.0], "float32"))) == pytest.approx(0.25, rel=1e-6)


def test_entropy_loss_hand_computed():
    probs = t([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], "float32")
    # H = log 2 and log 4; mean = 1.5 log 2.
    assert value(router_entropy_loss(probs)) == pytest.approx(1.5 * math.log(2), rel=1e-5)
    assert value(router_entropy_loss(probs, t([1, 0], "float32"))) == pytest.approx(math.log(2), rel=1e-5)


def test_existing_losses_unchanged():
    probs = t(np.full((4, 2), 0.5), "float32")
    assert value(load_balancing_loss(probs, t([4, 4], "int32"))) == pytest.approx(1.0)
    logits = t(np.zeros((3, 2)), "float32")
    assert value(router_z_loss(logits)) == pytest.approx(math.log(2) ** 2, rel=1e-5)
