"""Specialization analysis (`dl_moe.analysis`) against hand-computed counts."""

import math

import keras
import numpy as np
import pytest

import dl_moe
from dl_moe import analysis
from dl_moe.tools import plots

# The Dense layer before the MoE permutes the one-hot token features, so the router
# (kernel 10 * I) sends a token with a hot feature a to expert PERMUTATION[a]: the
# report must route the MoE layer's own inputs, not the model's.
PERMUTATION = [1, 0, 3, 2]
# Four examples of two tokens each, given by their hot feature, and their labels.
HOT_FEATURES = [(1, 1), (1, 0), (3, 3), (3, 2)]  # -> experts (0, 0), (0, 1), (2, 2), (2, 3)
LABELS = [0, 0, 1, 2]
# Assignments per label (rows) and expert (columns), counted by hand from the above.
COUNTS = np.array([[3, 1, 0, 0], [0, 0, 2, 0], [0, 0, 1, 1]], dtype=float)


def routed_model():
    inputs = keras.Input((2, 4))
    dense = keras.layers.Dense(4, use_bias=False, name="permute")
    moe = dl_moe.create_ffn_moe(4, 4, top_k=1, intermediate_size=4, name="moe")
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(moe(dense(inputs))))
    model = keras.Model(inputs, outputs)
    dense.set_weights([np.eye(4, dtype="float32")[PERMUTATION]])
    moe.gating_network.router_kernel.assign(10.0 * np.eye(4, dtype="float32"))
    x = np.zeros((4, 2, 4), dtype="float32")
    for example, features in enumerate(HOT_FEATURES):
        for token, feature in enumerate(features):
            x[example, token, feature] = 1.0
    return model, x


def test_report_of_a_model_matches_the_hand_counts(tmp_path):
    model, x = routed_model()
    reports = analysis.specialization_report(model, x, np.array(LABELS), batch_size=3)
    report = reports["moe"]
    np.testing.assert_array_equal(report.counts, COUNTS)
    np.testing.assert_allclose(report.label_share, [[0.75, 0.25, 0, 0], [0, 0, 1, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(report.expert_label_share[:, 2], [0, 2 / 3, 1 / 3])
    two_thirds = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) / math.log(3)
    np.testing.assert_allclose(report.entropy, [0, 0, two_thirds, 0], atol=1e-12)
    np.testing.assert_allclose(report.purity, [1, 1, 2 / 3, 1])
    np.testing.assert_array_equal(report.top_label, [0, 0, 1, 2])
    np.testing.assert_allclose(report.load, [3 / 8, 1 / 8, 3 / 8, 1 / 8])
    assert report.mean_purity == pytest.approx(3 / 8 + 1 / 8 + 3 / 8 * 2 / 3 + 1 / 8)
    path = plots.plot_specialization(reports, str(tmp_path / "specialization.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_counts_edge_cases_and_errors():
    report = analysis.specialization_from_counts([[2, 0], [2, 0]])
    np.testing.assert_allclose(report.entropy, [1.0, 0.0])  # uniform over two labels; unused expert
    np.testing.assert_array_equal(report.top_label, [0, -1])
    np.testing.assert_allclose(report.purity, [0.5, 0.0])
    # Soft MoE decisions add combine masses per token.
    mass = analysis.assignment_counts({"weights": np.array([[[0.25, 0.75], [0.5, 0.5]]])}, [1], 2, 2)
    np.testing.assert_allclose(mass, [[0, 0], [0.75, 1.25]])
    model, x = routed_model()
    with pytest.raises(ValueError, match="one label per example"):
        analysis.specialization_report(model, x, [0, 1])
    with pytest.raises(ValueError, match="no MixtureOfExperts"):
        analysis.specialization_report(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), x[:, 0, :3], [0] * 4)
