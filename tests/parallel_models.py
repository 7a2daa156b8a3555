"""A small model whose layers can be split over a `model` mesh axis (shared by tests)."""

import optax
from flax import nnx
from jax.sharding import PartitionSpec as P


class ColumnRowMLP(nnx.Module):
    """Linear (columns split over `model`) -> relu -> Linear (rows split over `model`)."""

    def __init__(self, rngs: nnx.Rngs, *, partitioned: bool = True, explicit: bool = False):
        init = nnx.initializers.lecun_normal()

        def part(fn, names):
            return nnx.with_partitioning(fn, names) if partitioned else fn

        self.explicit = explicit
        self.l1 = nnx.Linear(
            6,
            16,
            rngs=rngs,
            kernel_init=part(init, (None, "model")),
            bias_init=part(nnx.initializers.zeros, ("model",)),
        )
        self.l2 = nnx.Linear(16, 3, rngs=rngs, kernel_init=part(init, ("model", None)))

    def __call__(self, x):
        h = nnx.relu(self.l1(x))
        if self.explicit:
            # An Explicit mesh makes the row-parallel matmul say how its output is laid out.
            return self.l2(h, out_sharding=P("data", None))
        return self.l2(h)


def loss_fn(model, batch):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
