"""Expert parallelism with Keras's own distribution API (JAX / XLA SPMD).

Stacked expert weights `[E, ...]` are sharded along their expert axis over a device
mesh axis, so each device holds E / n experts. With `MoEConfig(expert_parallel=True)`
a token-choice layer then runs `dl_moe.expert_parallel` on JAX: the tokens stay
sharded over the batch axis and the expert axis (T / P per device), each device fills
`[E, C, d]` capacity buffers from its own tokens, and two explicit all-to-alls over
the expert axis move the routed rows to their experts' devices and back. The
compiled training step's collectives per device are the four all-to-alls
(2 × k·cf·T/P·d values forward, the same backward), the all-reduce of the replicated
router's gradient, and, on a data × expert mesh, the all-reduce of the expert
gradients over the data axis; nothing gathers the tokens
(`benchmarks/expert_parallel.py`, docs/benchmarks/expert_parallel.md).

Where that path does not apply (see `dl_moe.expert_parallel.expert_parallel_applies`:
other backends, expert-choice and Soft MoE routers, attention experts, a `model_axis`,
dropout in training, overflow rerouting, a token count the mesh does not divide), the
layer only constrains its `[E, C, d]` buffers to the expert axis and XLA chooses the
communication: in the benchmark it gathers every token to every device and
all-reduces the output, which does not shrink as devices are added.

With `batch_dim_name` equal to the expert axis (a 1-D mesh `("expert",)`), every
device holds T / P tokens and E / P experts. On a `("batch", "expert")` mesh the
input arrives sharded over "batch" only; the layer splits it over "expert" as well
inside the expert-parallel region (a local slice, no communication).

```python
import keras
from dl_moe.distribution import expert_parallel_layout_map

mesh = keras.distribution.DeviceMesh((8,), axis_names=("expert",),
                                     devices=keras.distribution.list_devices())
layout_map = expert_parallel_layout_map(mesh, expert_axis="expert")
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="expert"))
# build (expert_parallel=True), compile and fit the model as usual
```
"""

import keras

# Variable name → which of its axes (after the expert axis) the optional model axis
# shards: the hidden axis h of the FFN matrices.
_FFN_LAYOUTS = {
    "gate_kernel": (None, "model"),  # [E, d, h]
    "up_kernel": (None, "model"),  # [E, d, h]
    "down_kernel": ("model", None),  # [E, h, o]
    "gate_bias": ("model",),  # [E, h]
    "up_bias": ("model",),  # [E, h]
    "down_bias": (None,),  # [E, o]
}


def expert_parallel_layout_map(device_mesh, expert_axis="expert", model_axis=None):
    """A `LayoutMap` sharding every stacked FFN expert weight along its expert axis.

    Args:
        device_mesh: A `keras.distribution.DeviceMesh`.
        expert_axis: Mesh axis that shards the expert dimension E (which must be
            divisible by that axis's size).
        model_axis: Optional mesh axis that also shards the hidden dimension h.

    Returns:
        A `keras.distribution.LayoutMap` for
        `keras.distribution.ModelParallel(layout_map=..., batch_dim_name=...)`.
        Variables it does not name (routers, shared experts, other layers) are
        replicated.

    Raises:
        ValueError: If an axis name is not an axis of the mesh.
    """
    axis_names = tuple(device_mesh.axis_names)
    for name, axis in (("expert_axis", expert_axis), ("model_axis", model_axis)):
        if axis is not None and axis not in axis_names:
            raise ValueError(f"{name}={axis!r} is not an axis of the device mesh; mesh axes: {list(axis_names)}.")
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for variable, rest in _FFN_LAYOUTS.items():
        axes = (expert_axis,) + tuple(model_axis if a == "model" else None for a in rest)
        # `(.*/)?experts/` matches a MixtureOfExperts' routed bank, not `shared_experts/`.
        layout_map[f"(.*/)?experts/{variable}"] = axes
    return layout_map


def expert_axis_of(variable):
    """The mesh axis sharding `variable`'s first dimension, or None.

    Reads the layout the current distribution gives the variable, so the layer needs
    no axis name of its own.
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    layout = distribution.get_variable_layout(variable)
    axes = getattr(layout, "axes", None)
    return axes[0] if axes else None


def constrain_to_expert_axis(buffers, expert_weight):
    """Shards dispatch buffers `[E, C, ...]` like `expert_weight`'s expert axis.

    A no-op when no distribution is set or the weight is not sharded by expert. The
    fallback of layers `dl_moe.expert_parallel` does not run: a constraint only, XLA
    decides the communication.
    """
    axis = expert_axis_of(expert_weight)
    if axis is None:
        return buffers
    distribution = keras.distribution.distribution()
    layout = keras.distribution.TensorLayout(
        (axis,) + (None,) * (len(buffers.shape) - 1), distribution.device_mesh
    )
    return keras.distribution.distribute_tensor(buffers, layout)
