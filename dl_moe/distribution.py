"""Expert parallelism with Keras's own distribution API (JAX / XLA SPMD).

Stacked expert weights `[E, ...]` are sharded along their expert axis over a device
mesh axis, so each device holds E / n experts. With `MoEConfig(expert_parallel=True)`
the layer also constrains its `[E, C, d]` dispatch buffers to that axis, and XLA
inserts the all-to-all that moves each token to the device that owns its expert.

```python
import keras
from dl_moe.distribution import expert_parallel_layout_map

mesh = keras.distribution.DeviceMesh((2, 4), axis_names=("batch", "expert"),
                                     devices=keras.distribution.list_devices())
layout_map = expert_parallel_layout_map(mesh, expert_axis="expert")
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
# build, compile and fit the model as usual
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

    A no-op when no distribution is set or the weight is not sharded by expert.
    """
    axis = expert_axis_of(expert_weight)
    if axis is None:
        return buffers
    distribution = keras.distribution.distribution()
    layout = keras.distribution.TensorLayout(
        (axis,) + (None,) * (len(buffers.shape) - 1), distribution.device_mesh
    )
    return keras.distribution.distribute_tensor(buffers, layout)
