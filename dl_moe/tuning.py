"""Hyperparameter search over MoE routing settings with KerasTuner (optional extra).

`MoEHyperModel` wraps a user's model-building function. For every trial it picks the
router settings (top_k, gating type, temperature, training capacity factor, aux-loss
weight), passes them to the function as `MoEConfig` overrides, trains the model and
scores it:

    score = val_accuracy - flops_weight * expert_flops_per_token / reference_flops

where `expert_flops_per_token` is measured on the validation data: the experts each
token actually reached (`get_routing_stats()["avg_experts_per_token"]`, so dynamic-k
routers and dropped assignments count as they happen) times the FLOPs of one expert on
one token, summed over the model's MoE layers. With `flops_weight=0` the search
maximises validation accuracy alone.

    import keras_tuner
    from dl_moe.tuning import MoEHyperModel

    def build(overrides):          # overrides: dict of MoEConfig fields for every MoE layer
        model = build_classifier(**overrides)
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    tuner = keras_tuner.BayesianOptimization(
        MoEHyperModel(build, flops_weight=0.05), objective=keras_tuner.Objective("score", "max"),
        max_trials=8, directory="tuning", project_name="digits")
    tuner.search(x_train, y_train, validation_data=(x_val, y_val), epochs=10, verbose=0)

`keras-tuner` is only imported when this module is.
"""

import numpy as np

try:
    import keras_tuner
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("dl_moe.tuning needs the keras-tuner package (pip install dl_moe[tuner]).") from error

from dl_moe.callbacks import find_moe_layers

# The temperature a router uses when none is set (GatingConfig.temperature=None); the
# search multiplies it, so one range fits routers whose natural scales differ 14x.
DEFAULT_TEMPERATURE = {"cosine": 0.07}


def expert_flops_per_row(layer):
    """FLOPs one expert of `layer` spends on one row: 2 x one expert's parameters.

    Exact for FFN experts (every weight is one multiply-add per row); for attention
    experts it leaves out the score computation, which grows with the sequence.
    """
    total = sum(int(np.prod(w.shape)) for w in layer.experts.weights if w.trainable)
    return 2.0 * total / layer.config.num_experts


def expert_flops_per_token(model, reset=False):
    """Measured expert FLOPs per token, summed over the MoE layers of `model`.

    Reads each layer's routing statistics (call it after running the data of interest
    through the model; under JAX after `model.jax_state_sync()`).

    Args:
        model: A model with `MixtureOfExperts` layers.
        reset: Reset the layers' statistics after reading them.
    """
    total = 0.0
    for layer in find_moe_layers(model):
        total += layer.get_routing_stats()["avg_experts_per_token"] * expert_flops_per_row(layer)
        if reset:
            layer.reset_routing_stats()
    return total


class MoEHyperModel(keras_tuner.HyperModel):
    """A KerasTuner hypermodel that searches the routing settings of a model's MoE layers.

    Args:
        build_fn: `build_fn(overrides) -> compiled keras.Model`, where `overrides` is a
            dict of `MoEConfig` fields (`top_k`, `gating_type`, `temperature`,
            `train_capacity_factor`, `aux_loss_weight`) to apply to every MoE layer
            (e.g. pass them to `create_ffn_moe(**overrides)`). The model must report an
            accuracy metric when `flops_weight` is used with the default objective.
        top_k: Choices of experts per token (None: not searched).
        gating_types: Choices of token-choice routers (None: not searched).
        temperature_scale: `(low, high)` factor of the router's default temperature,
            searched on a log scale (None: not searched).
        capacity_factor: `(low, high)` of the training capacity factor (None: not searched).
        aux_loss_weight: `(low, high)` of the Switch loss weight, log scale (None: not searched).
        flops_weight: Weight of the FLOPs term of the score.
        reference_flops: FLOPs per token the term is divided by (None: the expert FLOPs
            per token of the first trial, so the term reads "relative to trial 1").
        accuracy_metric: Validation metric the score starts from.
    """

    def __init__(
        self,
        build_fn,
        top_k=(1, 2),
        gating_types=("linear", "cosine"),
        temperature_scale=(0.5, 2.0),
        capacity_factor=(1.0, 2.0),
        aux_loss_weight=(1e-3, 1e-1),
        flops_weight=0.0,
        reference_flops=None,
        accuracy_metric="val_accuracy",
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (("temperature_scale", temperature_scale), ("capacity_factor", capacity_factor),
                            ("aux_loss_weight", aux_loss_weight)):
            if value is not None and not (len(value) == 2 and 0 < value[0] <= value[1]):
                raise ValueError(f"{name} must be None or a pair 0 < low <= high, got {value!r}.")
        if flops_weight < 0:
            raise ValueError(f"flops_weight must be >= 0, got {flops_weight!r}.")
        self.build_fn = build_fn
        self.top_k = top_k
        self.gating_types = gating_types
        self.temperature_scale = temperature_scale
        self.capacity_factor = capacity_factor
        self.aux_loss_weight = aux_loss_weight
        self.flops_weight = float(flops_weight)
        self.reference_flops = reference_flops
        self.accuracy_metric = accuracy_metric

    def overrides(self, hp):
        """The `MoEConfig` overrides of one trial's hyperparameters."""
        chosen = {}
        if self.top_k is not None:
            chosen["top_k"] = hp.Choice("top_k", list(self.top_k))
        if self.gating_types is not None:
            chosen["gating_type"] = hp.Choice("gating_type", list(self.gating_types))
        if self.temperature_scale is not None:
            scale = hp.Float("temperature_scale", *self.temperature_scale, sampling="log")
            chosen["temperature"] = scale * DEFAULT_TEMPERATURE.get(chosen.get("gating_type"), 1.0)
        if self.capacity_factor is not None:
            chosen["train_capacity_factor"] = hp.Float("train_capacity_factor", *self.capacity_factor)
        if self.aux_loss_weight is not None:
            chosen["aux_loss_weight"] = hp.Float("aux_loss_weight", *self.aux_loss_weight, sampling="log")
        return chosen

    def build(self, hp):
        return self.build_fn(self.overrides(hp))

    def score(self, accuracy, flops):
        """`accuracy - flops_weight * flops / reference_flops`."""
        if self.reference_flops is None:
            self.reference_flops = flops
        return float(accuracy) - self.flops_weight * float(flops) / max(float(self.reference_flops), 1e-12)

    def fit(self, hp, model, *args, validation_data=None, **kwargs):
        """Trains, then measures the validation accuracy and expert FLOPs per token.

        Returns:
            dict with `score`, the accuracy metric and `expert_flops_per_token` (the
            objective is `keras_tuner.Objective("score", "max")`).
        """
        if validation_data is None:
            raise ValueError("MoEHyperModel.fit needs validation_data=(x, y): the score is measured on it.")
        history = model.fit(*args, validation_data=validation_data, **kwargs)
        accuracy = history.history[self.accuracy_metric][-1]
        for layer in find_moe_layers(model):
            layer.reset_routing_stats()
        x_val, y_val = validation_data[:2]
        model.evaluate(x_val, y_val, verbose=0)
        sync = getattr(model, "jax_state_sync", None)
        if sync is not None:
            sync()
        flops = expert_flops_per_token(model)
        return {"score": self.score(accuracy, flops), self.accuracy_metric: accuracy, "expert_flops_per_token": flops}
