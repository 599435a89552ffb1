"""Experts that split, merge and retire during training (`ExpertLifecycle`).

Design: a layer built with `MoEConfig(num_experts=E, initial_active_experts=n)` has
E expert slots of which n are live. Its router holds two non-trainable float32
variables, `active_experts [E]` (1 live, 0 dead) and `expert_logit_offset [E]` (a fixed
per-expert prior added to the logits after the temperature; see
`BaseGating.mask_logits`). A dead expert gets a logit of `DEAD_LOGIT`, so probability
0: it is never selected, takes no capacity and counts in no balancing loss (the
Switch and importance losses are taken over the live experts, the aux-free bias of a
dead expert is frozen). No weight ever changes shape, so the optimizer's slots stay
valid and a compiled train step (XLA under JAX / TF) keeps running without a retrace:
the mask is a variable read inside the step, edited between steps by this module.

Operations (eager, between steps; each takes the `MixtureOfExperts` layer):

* `split_expert(layer, s)`: the lowest free slot t becomes a copy of expert s, its
  expert weights perturbed by `noise * std(row) * N(0, 1)` per weight row (numpy
  generator, seeded), router rows copied (exactly, or with an antisymmetric
  perturbation +-delta that breaks ties between the halves, `router_noise`), and the
  logit offset of both halves set to offset_s - log 2. The softmax partition function is then unchanged: every
  other expert keeps its probability and the halves get p_s / 2 each.
* `retire_expert(layer, e)`: e is marked dead (its weights stay, unused, until a split
  reuses the slot).
* `merge_experts(layer, a, b)`: the rows of a become the mean of a's and b's, a's
  offset log(e^o_a + e^o_b) (so a carries both experts' mass when their router rows
  were equal) and b is freed.

What a split does to the layer's output (softmax routers, dropless or no expert over
capacity; tested in tests/test_lifecycle.py):

1. A token whose selected experts did not include s has exactly the same output
   (its probabilities are unchanged and the halves, at p_s / 2, rank below s). With
   `router_noise` (halves' logits z_s - log 2 +- d) the same holds where |d| < log 2
   (neither half then outranks s's old logit), with its weights scaled by
   Z / Z' = 1 / (1 + p_s * (cosh(d) - 1)): a second-order change.
2. With dense routing (top_k >= live experts) a token's output changes by exactly
   (p_s / 2) * (f_t(x) - f_s(x)): only the perturbation, ||dy|| <= p_s / 2 * ||f_t - f_s||.
3. With sparse top-k, a token that selected s may now select another expert in place
   of one half (each half has only p_s / 2), so its output is not bounded by the
   perturbation; the share of tokens that can change is s's load share.

Optimizer state: the slot rows (Adam's moments, SGD momentum, ...) of every changed
weight row follow the weights: copied from s on a split (the copy continues s's
trajectory; zero would not be neutral for every optimizer, e.g. Adagrad), averaged on
a merge, left as they are on a retire (a dead row is rewritten on reuse).

`ExpertLifecycle` is the Keras callback that applies these from the routing
statistics every N steps; its settings round-trip through `get_config` /
`from_config`, and the lifecycle state (mask and offsets) through `.keras` files as
layer variables.
"""

import math

import keras
import numpy as np
from keras import ops

from dl_moe.callbacks import find_moe_layers
from dl_moe.layer import MixtureOfExperts

# Expert banks whose every weight is stacked [E, ...] (one row per expert).
STACKED_EXPERT_TYPES = ("ffn", "conv2d")


# ------------------------------------------------------------------ rows


def _check_layer(layer):
    """The layer must hold an active-expert mask and a stacked, float expert bank."""
    if not isinstance(layer, MixtureOfExperts) or not layer.built:
        raise ValueError(f"Expected a built MixtureOfExperts layer, got {layer!r}.")
    if not getattr(layer.gating_network, "has_expert_mask", False):
        raise ValueError(
            f"Layer {layer.name!r} has no active-expert mask: build it with MoEConfig.initial_active_experts set."
        )
    expert_type = layer.config.expert_config.expert_type
    if expert_type not in STACKED_EXPERT_TYPES:
        raise ValueError(
            f"Expert lifecycle needs expert_type in {list(STACKED_EXPERT_TYPES)}, got {expert_type!r}."
        )
    if getattr(layer.experts, "quantization_mode", None):
        raise ValueError(f"Expert lifecycle does not edit quantized expert banks (layer {layer.name!r}).")


def _bank_variables(layer):
    """`[(variable, 0)]` of the expert bank: every weight is `[E, ...]`."""
    num_experts = layer.config.num_experts
    return [(v, 0) for v in layer.experts.weights if len(v.shape) and v.shape[0] == num_experts]


def _router_variables(layer):
    return list(layer.gating_network.expert_axis_variables())


def _read(variable):
    return np.array(ops.convert_to_numpy(variable), dtype="float64")


def _write(variable, array):
    variable.assign(ops.cast(ops.convert_to_tensor(np.asarray(array, dtype="float32")), variable.dtype))


def optimizer_slots(optimizer, variable):
    """The optimizer variables shaped like `variable` that track it (moments, momentum).

    Found generically: every list attribute of the (inner) optimizer with one entry per
    trainable variable. Empty when the optimizer is None, unbuilt or does not train
    `variable`.
    """
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if optimizer is None or not getattr(optimizer, "built", False):
        return []
    trainable = getattr(optimizer, "_trainable_variables", None) or []
    try:
        index = optimizer._get_variable_index(variable)
    except (KeyError, AttributeError):
        return []
    slots = []
    for value in vars(optimizer).values():
        if value is trainable or not isinstance(value, (list, tuple)) or len(value) != len(trainable):
            continue
        slot = value[index]
        if isinstance(slot, keras.Variable) and tuple(slot.shape) == tuple(variable.shape):
            slots.append(slot)
    return slots


def _edit_rows(variable, axis, edit):
    """Applies `edit(rows)` to `variable` viewed as `[E, ...]` (expert axis first)."""
    array = _read(variable)
    edit(np.moveaxis(array, axis, 0))  # a view: edits land in `array`
    _write(variable, array)


def _state(layer):
    router = layer.gating_network
    return _read(router.active_experts) > 0.5, _read(router.expert_logit_offset)


def _set_state(layer, live, offset):
    router = layer.gating_network
    _write(router.active_experts, np.asarray(live, dtype="float32"))
    _write(router.expert_logit_offset, offset)


def _trainable_rows(layer):
    return [(v, axis) for v, axis in _bank_variables(layer) + _router_variables(layer) if v.trainable]


# ------------------------------------------------------------ operations


def split_expert(layer, source, target=None, noise=0.01, router_noise=0.0, rng=None, optimizer=None):
    """Splits live expert `source` into itself and the free slot `target`.

    Args:
        layer: A built `MixtureOfExperts` with an active-expert mask.
        source: The live expert to split.
        target: A dead slot (None: the lowest dead one).
        noise: Relative perturbation of the copy's expert weights (std of the row
            times N(0, 1), times `noise`); 0 gives an exact copy.
        router_noise: Relative, antisymmetric perturbation of the trainable router
            rows: source gets r + delta, target r - delta (delta = router_noise *
            std(r) * N(0, 1)), so that tokens tied between the halves split between
            them; the partition function then grows by a factor 1 + p_s * (cosh(d) - 1),
            d the logit perturbation (second order). 0 keeps both rows equal (exact, but top-1 routing
            breaks the tie the same way for every token).
        rng: A `numpy.random.Generator` (None: `default_rng(0)`).
        optimizer: The model's optimizer, whose slot rows are copied likewise.

    Returns:
        The target slot.
    """
    _check_layer(layer)
    live, offset = _state(layer)
    if not 0 <= source < len(live) or not live[source]:
        raise ValueError(f"split_expert: source must be a live expert, got {source!r} (live: {np.flatnonzero(live)}).")
    if target is None:
        free = np.flatnonzero(~live)
        if not free.size:
            raise ValueError(f"split_expert: layer {layer.name!r} has no free expert slot.")
        target = int(free[0])
    elif not 0 <= target < len(live) or live[target]:
        raise ValueError(f"split_expert: target must be a dead slot, got {target!r}.")
    rng = np.random.default_rng(0) if rng is None else rng

    def copy_row(rows):
        rows[target] = rows[source]

    def perturbed_copy(rows):
        row = rows[source]
        rows[target] = row + noise * row.std() * rng.standard_normal(row.shape)

    for variable, axis in _bank_variables(layer):
        _edit_rows(variable, axis, perturbed_copy if noise else copy_row)
    def antisymmetric_copy(rows):
        row = np.array(rows[source])
        delta = router_noise * row.std() * rng.standard_normal(row.shape)
        rows[source], rows[target] = row + delta, row - delta

    for variable, axis in _router_variables(layer):
        _edit_rows(variable, axis, antisymmetric_copy if router_noise and variable.trainable else copy_row)
    for variable, axis in _trainable_rows(layer):
        for slot in optimizer_slots(optimizer, variable):
            _edit_rows(slot, axis, copy_row)
    live[target] = True
    offset[source] = offset[target] = offset[source] - math.log(2.0)
    _set_state(layer, live, offset)
    return target


def retire_expert(layer, expert):
    """Marks live `expert` dead (it is never selected again until a split reuses it)."""
    _check_layer(layer)
    live, offset = _state(layer)
    if not 0 <= expert < len(live) or not live[expert]:
        raise ValueError(f"retire_expert: expert must be live, got {expert!r} (live: {np.flatnonzero(live)}).")
    if live.sum() <= 1:
        raise ValueError("retire_expert: the last live expert cannot be retired.")
    live[expert] = False
    offset[expert] = 0.0
    _set_state(layer, live, offset)


def merge_experts(layer, keep, drop, optimizer=None):
    """Merges live expert `drop` into live expert `keep` (rows averaged, `drop` freed)."""
    _check_layer(layer)
    live, offset = _state(layer)
    if keep == drop or not (0 <= keep < len(live) and 0 <= drop < len(live) and live[keep] and live[drop]):
        raise ValueError(f"merge_experts: keep and drop must be two live experts, got {keep!r}, {drop!r}.")

    def average(rows):
        rows[keep] = 0.5 * (rows[keep] + rows[drop])

    for variable, axis in _bank_variables(layer) + _router_variables(layer):
        _edit_rows(variable, axis, average)
    for variable, axis in _trainable_rows(layer):
        for slot in optimizer_slots(optimizer, variable):
            _edit_rows(slot, axis, average)
    offset[keep] = np.logaddexp(offset[keep], offset[drop])
    live[drop] = False
    offset[drop] = 0.0
    _set_state(layer, live, offset)


def _cosine(a, b):
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else 0.0


def expert_similarity(layer, a, b):
    """`(router cosine, weight cosine)` of experts a and b: cosine similarity of their
    concatenated trainable router rows and of their concatenated expert-bank rows."""
    _check_layer(layer)

    def rows(variables, expert):
        return np.concatenate(
            [np.moveaxis(_read(v), axis, 0)[expert].ravel() for v, axis in variables if v.trainable] or [np.zeros(1)]
        )

    router, bank = _router_variables(layer), _bank_variables(layer)
    return _cosine(rows(router, a), rows(router, b)), _cosine(rows(bank, a), rows(bank, b))


# -------------------------------------------------------------- callback


def _check_share(name, value, optional=True):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        allowed = "a number in [0, 1]" + (" or None" if optional else "")
        raise ValueError(f"ExpertLifecycle.{name} must be {allowed}, got {value!r}.")


def _check_count(name, value, optional=False, minimum=1):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"ExpertLifecycle.{name} must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}."
        )


@keras.saving.register_keras_serializable(package="dl_moe")
class ExpertLifecycle(keras.callbacks.Callback):
    """Splits overloaded experts, retires idle ones and merges converged pairs.

    Every `every_n_steps` training steps the callback reads each watched layer's
    routing statistics (`get_routing_stats`: the per-expert share of routed
    assignments since its last check, so it never resets the statistics other
    callbacks read) and, per layer, in this order:

    1. with `merge_threshold`, merges live pairs whose router rows and expert weights
       both have cosine similarity above it (the lower index is kept; first, since a
       duplicate that top-k starves would otherwise look idle);
    2. retires every live expert whose share stayed below `retire_threshold` for
       `patience` checks (lowest share first, keeping `min_active_experts` live);
    3. splits every live expert whose share stayed above `split_threshold` for
       `patience` checks (highest share first) into the lowest free slot, while the
       layer has fewer than `max_active_experts` live experts.

    See the module docstring for what a split does to the output and the optimizer.
    Under JAX the trainer state is synced into the variables first
    (`model.jax_state_sync()`); the edited variables are then read by the next step.

    Args:
        every_n_steps: Steps between checks (>= 1).
        split_threshold: Share of the layer's routed assignments in [0, 1] above which
            an expert is split (None: never split).
        retire_threshold: Share below which an expert is retired (None: never).
        merge_threshold: Cosine similarity in [0, 1] above which two experts merge
            (None: never merge).
        patience: Consecutive checks a split/retire condition must hold (>= 1).
        noise: Relative perturbation of a split copy's expert weights (>= 0).
        router_noise: Relative antisymmetric perturbation of the split halves' router
            rows (>= 0; see `split_expert`), so that top-1 tokens divide between them.
        seed: Seed of the numpy generator of the perturbations.
        min_active_experts: Live experts a layer always keeps (>= 1).
        max_active_experts: Live experts splits stop at (None: E).
        layers: Names of the `MixtureOfExperts` layers to manage (None: every one
            with an active-expert mask).

    Attributes:
        history: `[{"step": s, "live": {layer name: live experts}}]`, one entry when
            training begins and one per check.
        events: `[{"step", "layer", "action" ("split"/"retire"/"merge"), "experts"}]`.

    Example:
        ```python
        import numpy as np
        import keras
        import dl_moe

        moe = dl_moe.create_ffn_moe(4, 8, top_k=1, intermediate_size=8, drop_tokens=False,
                                    initial_active_experts=2, name="moe")
        model = keras.Sequential([keras.Input((4, 8)), moe])
        model.compile("adam", "mse")
        lifecycle = dl_moe.ExpertLifecycle(every_n_steps=2, split_threshold=0.3)
        model.fit(np.random.rand(32, 4, 8), np.random.rand(32, 4, 8), batch_size=8, epochs=1,
                  verbose=0, callbacks=[lifecycle])
        print(lifecycle.history[-1])  # live experts per layer at the last check
        ```
    """

    def __init__(
        self,
        every_n_steps=100,
        split_threshold=0.5,
        retire_threshold=0.01,
        merge_threshold=None,
        patience=1,
        noise=0.01,
        router_noise=0.05,
        seed=0,
        min_active_experts=1,
        max_active_experts=None,
        layers=None,
    ):
        super().__init__()
        _check_count("every_n_steps", every_n_steps)
        _check_share("split_threshold", split_threshold)
        _check_share("retire_threshold", retire_threshold)
        _check_share("merge_threshold", merge_threshold)
        _check_count("patience", patience)
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
            raise ValueError(f"ExpertLifecycle.noise must be a number >= 0, got {noise!r}.")
        if isinstance(router_noise, bool) or not isinstance(router_noise, (int, float)) or router_noise < 0:
            raise ValueError(f"ExpertLifecycle.router_noise must be a number >= 0, got {router_noise!r}.")
        _check_count("seed", seed, minimum=0)
        _check_count("min_active_experts", min_active_experts)
        _check_count("max_active_experts", max_active_experts, optional=True)
        if max_active_experts is not None and max_active_experts < min_active_experts:
            raise ValueError(
                f"ExpertLifecycle.max_active_experts must be >= min_active_experts={min_active_experts}, "
                f"got {max_active_experts}."
            )
        if split_threshold is not None and retire_threshold is not None and retire_threshold >= split_threshold:
            raise ValueError(
                f"ExpertLifecycle.retire_threshold must be below split_threshold={split_threshold}, "
                f"got {retire_threshold}."
            )
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise ValueError(f"ExpertLifecycle.layers must be None or a list of layer names, got {layers!r}.")
        self.every_n_steps = every_n_steps
        self.split_threshold = split_threshold
        self.retire_threshold = retire_threshold
        self.merge_threshold = merge_threshold
        self.patience = patience
        self.noise = float(noise)
        self.router_noise = float(router_noise)
        self.seed = seed
        self.min_active_experts = min_active_experts
        self.max_active_experts = max_active_experts
        self.layers = None if layers is None else list(layers)
        self.history = []
        self.events = []
        self._rng = np.random.default_rng(seed)
        self._step = 0
        self._watched = []
        self._last_counts = {}
        self._over = {}
        self._under = {}

    def get_config(self):
        return {
            "every_n_steps": self.every_n_steps,
            "split_threshold": self.split_threshold,
            "retire_threshold": self.retire_threshold,
            "merge_threshold": self.merge_threshold,
            "patience": self.patience,
            "noise": self.noise,
            "router_noise": self.router_noise,
            "seed": self.seed,
            "min_active_experts": self.min_active_experts,
            "max_active_experts": self.max_active_experts,
            "layers": self.layers,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # --------------------------------------------------------------- helpers

    def _sync(self):
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()

    def _live_counts(self):
        return {layer.name: int(layer.get_active_experts().sum()) for layer in self._watched}

    def _record(self):
        self.history.append({"step": self._step, "live": self._live_counts()})

    def _event(self, layer, action, experts):
        self.events.append({"step": self._step, "layer": layer.name, "action": action, "experts": experts})

    def _shares(self, layer):
        """This window's share of routed assignments per expert `[E]` (None: no assignment)."""
        stats = layer.get_routing_stats()
        counts = np.asarray(stats["expert_fraction"]) * stats["avg_experts_per_token"] * stats["tokens"]
        last = self._last_counts.get(layer.name)
        # Statistics reset since the last check (e.g. by RoutingMonitor): count from zero.
        window = counts if last is None or np.any(counts < last - 0.5) else counts - last
        self._last_counts[layer.name] = counts
        total = window.sum()
        return window / total if total > 0 else None

    # ------------------------------------------------------------- callbacks

    def on_train_begin(self, logs=None):
        found = [
            layer for layer in find_moe_layers(self.model) if getattr(layer.gating_network, "has_expert_mask", False)
        ]
        if self.layers is not None:
            by_name = {layer.name: layer for layer in found}
            missing = [name for name in self.layers if name not in by_name]
            if missing:
                raise ValueError(
                    f"ExpertLifecycle.layers names {missing}, which are not MixtureOfExperts layers with an "
                    f"active-expert mask in the model; those are {sorted(by_name)}."
                )
            found = [by_name[name] for name in self.layers]
        if not found:
            raise ValueError(
                "ExpertLifecycle found no MixtureOfExperts layer with an active-expert mask: build the layers with "
                "MoEConfig.initial_active_experts set."
            )
        for layer in found:
            _check_layer(layer)
            num_experts = layer.config.num_experts
            self._over.setdefault(layer.name, np.zeros(num_experts, dtype=int))
            self._under.setdefault(layer.name, np.zeros(num_experts, dtype=int))
        self._watched = found
        self._sync()
        for layer in found:
            self._shares(layer)  # the first window starts now
        self._record()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every_n_steps == 0:
            self._sync()
            for layer in self._watched:
                self._check(layer)
            self._record()

    def _check(self, layer):
        shares = self._shares(layer)
        if shares is None:
            return
        live, _ = _state(layer)
        over, under = self._over[layer.name], self._under[layer.name]
        hot = live & (shares > self.split_threshold) if self.split_threshold is not None else np.zeros_like(live)
        cold = live & (shares < self.retire_threshold) if self.retire_threshold is not None else np.zeros_like(live)
        over[:] = np.where(hot, over + 1, 0)
        under[:] = np.where(cold, under + 1, 0)
        optimizer = getattr(self.model, "optimizer", None)
        if self.merge_threshold is not None:
            self._merge(layer, optimizer)
        for expert in np.argsort(shares, kind="stable"):
            live, _ = _state(layer)
            if live[expert] and under[expert] >= self.patience and live.sum() > self.min_active_experts:
                retire_expert(layer, int(expert))
                self._event(layer, "retire", [int(expert)])
                over[expert] = under[expert] = 0
        cap = self.max_active_experts or layer.config.num_experts
        for expert in np.argsort(-shares, kind="stable"):
            live, _ = _state(layer)
            if over[expert] < self.patience or not live[expert] or live.sum() >= cap or live.all():
                continue
            target = split_expert(
                layer, int(expert), noise=self.noise, router_noise=self.router_noise, rng=self._rng, optimizer=optimizer
            )
            self._event(layer, "split", [int(expert), target])
            over[expert] = under[expert] = over[target] = under[target] = 0

    def _merge(self, layer, optimizer):
        live, _ = _state(layer)
        experts = list(np.flatnonzero(live))
        for i, a in enumerate(experts):
            for b in experts[i + 1:]:
                live, _ = _state(layer)
                if not (live[a] and live[b]) or live.sum() <= self.min_active_experts:
                    continue
                if min(expert_similarity(layer, int(a), int(b))) > self.merge_threshold:
                    merge_experts(layer, int(a), int(b), optimizer=optimizer)
                    self._event(layer, "merge", [int(a), int(b)])
                    self._over[layer.name][b] = self._under[layer.name][b] = 0
