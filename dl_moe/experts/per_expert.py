"""Plug-in experts: a user writes ONE expert as a `BaseExpert`; the layer makes E of them.

Register the class under a new `expert_type` and pass its constructor arguments in
`ExpertConfig.expert_kwargs` (a JSON-serialisable dict, so the model saves as
`.keras`):

    @keras.saving.register_keras_serializable(package="my_project")
    class CustomExpert(BaseExpert):
        def __init__(self, units, **kwargs): ...
        def build(self, input_shape): ...
        def call(self, inputs, training=None): ...     # [N, d] -> [N, units]
        def compute_output_shape(self, input_shape): ...

    register_expert("custom", CustomExpert)
    layer = MixtureOfExperts(MoEConfig(expert_config=ExpertConfig(
        expert_type="custom", hidden_dim=64, expert_kwargs={"units": 64})))

Each expert receives only the rows dispatched to it, as a 2-D `[N, d]` batch.
"""

import keras
from keras import ops

from dl_moe.experts.base import ExpertBank
from dl_moe.registry import EXPERT_TYPES


class BaseExpert(keras.layers.Layer):
    """Base class of user-written experts: one expert, a Keras layer `[N, d] -> [N, o]`.

    Subclasses implement `build(input_shape)`, `call(inputs, training=None)` and
    `compute_output_shape(input_shape)` like any Keras layer. `MixtureOfExperts`
    creates `num_experts` instances with `cls(**expert_kwargs, name="expert_<i>",
    dtype=...)` inside a `PerExpertBank` and calls each only on its dispatched rows.
    Every row is an independent token: an expert must treat rows independently (no
    batch statistics), since rows of empty capacity are zeros.
    """

    token_layout = "token"
    input_rank = None
    config_fields = ("expert_kwargs",)

    @classmethod
    def from_moe_config(cls, config, name=None, dtype=None):
        """The bank of `num_experts` instances of this class described by a `MoEConfig`."""
        return PerExpertBank(
            num_experts=config.num_experts,
            expert_type=config.expert_config.expert_type,
            expert_kwargs=config.expert_config.expert_kwargs,
            name=name,
            dtype=dtype,
        )


def _is_concrete_torch(tensor):
    """True for a real (not symbolic / meta) torch tensor on the torch backend."""
    if keras.backend.backend() != "torch":
        return False
    import torch

    return isinstance(tensor, torch.Tensor) and tensor.device.type != "meta"


@keras.saving.register_keras_serializable(package="dl_moe")
class PerExpertBank(ExpertBank):
    """Wraps E instances of a registered `BaseExpert` subclass as an expert bank.

    * Capacity mode (G == E, `group_expert=None`): expert e runs on group e's `[C, d]`
      rows only; the cost is that of the C dispatched rows per expert.
    * Dropless mode (`group_expert [G]`): exact in every case. On PyTorch (eager) each
      expert gathers the blocks it owns (a dynamic-size slice) and runs only on them.
      Under a compiled backend (TensorFlow, JAX) shapes must be static, so every expert
      runs on all G*R dropless rows and each row keeps its owner's result: exact, but
      E times the work; prefer capacity mode (the default) with plug-in experts there.

    Args:
        num_experts: E.
        expert_type: The registered name of the `BaseExpert` subclass.
        expert_kwargs: Keyword arguments of its constructor (dict or None).
    """

    def __init__(self, num_experts, expert_type, expert_kwargs=None, **kwargs):
        super().__init__(num_experts, **kwargs)
        expert_cls = EXPERT_TYPES.get(expert_type)
        if not (isinstance(expert_cls, type) and issubclass(expert_cls, BaseExpert)):
            raise ValueError(f"expert_type {expert_type!r} is not a BaseExpert subclass, got {expert_cls!r}.")
        self.expert_type = expert_type
        self.expert_kwargs = dict(expert_kwargs or {})
        try:
            self.expert_layers = [
                expert_cls(**self.expert_kwargs, name=f"expert_{i}", dtype=self.dtype_policy)
                for i in range(num_experts)
            ]
        except TypeError as error:
            raise ValueError(
                f"Could not create expert_type {expert_type!r} with ExpertConfig.expert_kwargs="
                f"{self.expert_kwargs!r}: {error}"
            ) from error

    def build(self, input_shape):
        d = input_shape[-1]
        probe = ops.zeros((1, d), dtype=self.compute_dtype)
        for expert in self.expert_layers:
            # One real call builds the expert and any sub-layers it creates lazily (a
            # symbolic call would stop at a user-defined compute_output_shape).
            expert(probe)
        self.built = True

    def _run(self, expert, rows, training):
        """Expert on `[..., R, d]` rows, as a 2-D batch; returns `[..., R, o]`."""
        leading = ops.shape(rows)[:-1]
        out = expert(ops.reshape(rows, (-1, rows.shape[-1])), training=training)
        return ops.reshape(out, tuple(leading) + (out.shape[-1],))

    def call(self, inputs, group_expert=None, training=None):
        """Runs each expert on its own rows.

        Args:
            inputs: `[G, R, d]` dispatched rows.
            group_expert: `[G]` owner of each group, or None when G == E.
            training: Passed to the experts.

        Returns:
            `[G, R, o]`.
        """
        if group_expert is None:
            return ops.stack([self._run(expert, inputs[e], training) for e, expert in enumerate(self.expert_layers)])
        if _is_concrete_torch(inputs):
            return self._call_torch_dropless(inputs, group_expert, training)
        outputs = None
        for e, expert in enumerate(self.expert_layers):
            owned = ops.reshape(ops.equal(group_expert, e), (-1, 1, 1))  # [G, 1, 1]
            result = self._run(expert, inputs, training)  # [G, R, o]
            outputs = ops.where(owned, result, ops.zeros_like(result) if outputs is None else outputs)
        return outputs

    def _call_torch_dropless(self, inputs, group_expert, training):
        import torch

        outputs = None
        for e, expert in enumerate(self.expert_layers):
            owned = torch.nonzero(group_expert == e).flatten()
            if owned.numel() == 0 and outputs is not None:
                continue
            result = self._run(expert, inputs[owned], training)  # [G_e, R, o]
            if outputs is None:
                outputs = inputs.new_zeros(tuple(inputs.shape[:2]) + (result.shape[-1],), dtype=result.dtype)
            outputs = outputs.index_copy(0, owned, result)
        return outputs

    def compute_output_shape(self, input_shape):
        inner = self.expert_layers[0].compute_output_shape((input_shape[1], input_shape[-1]))
        return (input_shape[0],) + tuple(inner)

    def get_config(self):
        config = super().get_config()
        config.update({"expert_type": self.expert_type, "expert_kwargs": self.expert_kwargs})
        return config
