"""Expert specialization: which experts handle which labels.

Given a model and labelled examples (e.g. the digit classes, or the file type of each
text sequence), `specialization_report` routes every example's tokens through each
`MixtureOfExperts` layer (its router only, `MixtureOfExperts.route`, in inference mode)
and counts, per label, the assignments each expert receives. Every token of an example
carries the example's label.

From a `[L, E]` count matrix (L labels, E experts) it derives:

* `label_share [L, E]`: the share of label l's assignments that went to expert e
  (each row sums to 1): where a class is sent.
* `expert_label_share [L, E]`: the share of expert e's assignments that came from
  label l (each column sums to 1): what an expert sees.
* `entropy [E]`: the entropy of expert e's label distribution divided by log L, so 0
  means the expert sees a single label and 1 means all labels equally often.
* `purity [E]`: the largest share of one label in expert e's assignments, and
  `top_label [E]` that label.
* `load [E]`: expert e's share of all assignments.

Counts are router assignments (capacity plays no part): what the router wants, not
what a full expert computed. Soft MoE layers count each token's combine weight per
expert instead (every token reaches every expert).
"""

import dataclasses
from typing import Optional

import numpy as np
from keras import ops


@dataclasses.dataclass
class SpecializationReport:
    """Specialization of one MoE layer (see the module docstring for each field)."""

    counts: np.ndarray  # [L, E]
    label_share: np.ndarray  # [L, E]
    expert_label_share: np.ndarray  # [L, E]
    entropy: np.ndarray  # [E]
    purity: np.ndarray  # [E]
    top_label: np.ndarray  # [E]
    load: np.ndarray  # [E]
    label_names: Optional[list] = None

    @property
    def mean_purity(self):
        """Purity averaged over experts, weighted by their load."""
        return float(np.sum(self.purity * self.load))


def _normalise(matrix, axis):
    total = matrix.sum(axis=axis, keepdims=True)
    return np.divide(matrix, total, out=np.zeros_like(matrix), where=total > 0)


def specialization_from_counts(counts, label_names=None):
    """A `SpecializationReport` from an `[L, E]` matrix of assignment counts (or masses).

    An expert with no assignments gets entropy 0, purity 0 and `top_label` -1.
    """
    counts = np.asarray(counts, dtype="float64")
    if counts.ndim != 2:
        raise ValueError(f"counts must be a [labels, experts] matrix, got shape {counts.shape}.")
    num_labels = counts.shape[0]
    per_expert = counts.sum(axis=0)
    expert_label_share = _normalise(counts, axis=0)
    logs = np.log(np.where(expert_label_share > 0, expert_label_share, 1.0))
    entropy = -np.sum(expert_label_share * logs, axis=0)
    if num_labels > 1:
        entropy = entropy / np.log(num_labels)
    used = per_expert > 0
    total = per_expert.sum()
    return SpecializationReport(
        counts=counts,
        label_share=_normalise(counts, axis=1),
        expert_label_share=expert_label_share,
        entropy=np.where(used, entropy, 0.0),
        purity=np.where(used, expert_label_share.max(axis=0), 0.0),
        top_label=np.where(used, expert_label_share.argmax(axis=0), -1),
        load=per_expert / total if total > 0 else per_expert,
        label_names=None if label_names is None else list(label_names),
    )


def assignment_counts(decision, example_labels, num_labels, num_experts):
    """`[L, E]` counts of one routing decision (`MixtureOfExperts.route` output).

    Args:
        decision: dict with `indices`/`active` `[T, k]` (token- and expert-choice
            routers), or `weights [B, S, E]` alone (Soft MoE: masses are added).
        example_labels: `[N]` int label of each example; the T tokens are the N
            examples' tokens in order (T = N * tokens per example).
        num_labels: L.
        num_experts: E.
    """
    example_labels = np.asarray(example_labels).astype("int64").reshape(-1)
    counts = np.zeros((num_labels, num_experts))
    if "indices" not in decision:
        mass = np.asarray(decision["weights"], dtype="float64").reshape(-1, num_experts)  # [T, E]
        token_labels = np.repeat(example_labels, mass.shape[0] // len(example_labels))
        np.add.at(counts, token_labels, mass)
        return counts
    indices, active = np.asarray(decision["indices"]), np.asarray(decision["active"], dtype=bool)
    token_labels = np.repeat(example_labels, indices.shape[0] // len(example_labels))  # [T]
    labels = np.broadcast_to(token_labels[:, None], indices.shape)
    np.add.at(counts, (labels[active], indices[active]), 1.0)
    return counts


def _layer_input_model(model, layers):
    """A model from `model`'s inputs to each layer's input (functional / Sequential graphs)."""
    import keras

    try:
        return keras.Model(model.input, [layer.input for layer in layers])
    except Exception as error:  # a nested or shared layer has no single graph input
        raise ValueError(
            "specialization_report needs MoE layers called once in the model's own functional graph "
            f"(their `layer.input` must be reachable from model.inputs): {error}"
        ) from error


def specialization_report(model, x, y, num_labels=None, label_names=None, layers=None, batch_size=256):
    """Per MoE layer, the labels x experts specialization of `model` on `(x, y)`.

    Args:
        model: A built Keras model containing `MixtureOfExperts` layers.
        x: Model inputs `[N, ...]` (numpy).
        y: `[N]` integer label per example (e.g. its class).
        num_labels: L (None: max(y) + 1).
        label_names: Optional names of the L labels (kept for plots).
        layers: The MoE layers to analyse (None: every one found in the model).
        batch_size: Examples routed per call.

    Returns:
        `{layer name: SpecializationReport}`.
    """
    from dl_moe.callbacks import find_moe_layers

    y = np.asarray(y).astype("int64").reshape(-1)
    if len(y) != len(x):
        raise ValueError(f"y must have one label per example: len(x)={len(x)}, len(y)={len(y)}.")
    if y.min() < 0:
        raise ValueError(f"y must hold labels >= 0, got min {y.min()}.")
    num_labels = int(y.max()) + 1 if num_labels is None else num_labels
    layers = find_moe_layers(model) if layers is None else list(layers)
    if not layers:
        raise ValueError("specialization_report found no MixtureOfExperts layer in the model.")
    probe = _layer_input_model(model, layers)
    counts = {layer.name: np.zeros((num_labels, layer.config.num_experts)) for layer in layers}
    for start in range(0, len(x), batch_size):
        batch_inputs = probe(x[start : start + batch_size], training=False)
        batch_inputs = batch_inputs if isinstance(batch_inputs, (list, tuple)) else [batch_inputs]
        for layer, inputs in zip(layers, batch_inputs):
            decision = layer.route(ops.convert_to_tensor(inputs), training=False)
            counts[layer.name] += assignment_counts(
                decision, y[start : start + batch_size], num_labels, layer.config.num_experts
            )
    return {name: specialization_from_counts(c, label_names) for name, c in counts.items()}
