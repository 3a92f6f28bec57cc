"""Memory accountings of any Flax network, by name: the one memnas_jax reports, and the others
that published tables use (README, "Memory accounting").

* `liveness` (ours): the peak of live activations of the inference pass at batch 1
  (`memory.analyze`, paper convention);
* `liveness_strict_b16`: the same peak, strict convention, at batch 16: reproduces the MemNAS
  paper's ResNet rows;
* `layer_outputs`: the sum of every layer's (convolution / dense) output at batch 1, as if no
  buffer were ever reused;
* `training_activations`: the activations the backward pass keeps, at batch 1;
* `tflm` (measured, not modelled): the network exported to LiteRT (`memnas_jax.export`) and run
  in TFLite Micro at batch 1; working memory is the head of the arena its memory planner
  allocates (activations, pad copies, concatenation buffers and kernel scratch; docs/deploy.md).
  Needs the deploy extra.

All in bytes, float32. Parameter memory is 4 bytes per trainable parameter in every accounting.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from memnas_jax import memory

ACCOUNTINGS = ("liveness", "liveness_strict_b16", "layer_outputs", "training_activations", "tflm")
OURS = "liveness"


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A network's memory under one accounting, in bytes."""

    accounting: str
    param_count: int
    param_bytes: int
    working_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.working_bytes

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), total_bytes=self.total_bytes)


def _layer_output_bytes(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        for sub in jax_core.jaxprs_in_params(eqn.params):
            total += _layer_output_bytes(sub)
        if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
            aval = eqn.outvars[0].aval
            total += aval.size * aval.dtype.itemsize
    return total


def measure(model: nn.Module, image_shape: tuple[int, ...], accounting: str = OURS
            ) -> Measurement:
    """`model` (`__call__(x, train)`, BatchNorm in `batch_stats`) on (H, W, C) images."""
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"unknown accounting {accounting!r}; use one of {ACCOUNTINGS}")

    def image(batch: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)

    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(image(1).shape),
                                                  train=False))
    param_count = sum(x.size for x in jax.tree.leaves(variables["params"]))

    def forward(v: Any, x: jax.Array) -> jax.Array:
        return model.apply(v, x, train=False)

    if accounting == "liveness":
        working = memory.analyze(forward, variables, image(1)).working_bytes_paper
    elif accounting == "liveness_strict_b16":
        working = memory.analyze(forward, variables, image(16)).working_bytes_strict
    elif accounting == "tflm":
        from memnas_jax import deployment, export, runtimes
        weights = deployment.numpy_variables(model, image_shape)  # the arena needs no training
        flatbuffer = export.to_flatbuffer(export.inference_fn(model, weights), (1, *image_shape))
        working = runtimes.tflm_allocations(flatbuffer)["head"]
    elif accounting == "layer_outputs":
        working = _layer_output_bytes(jax.make_jaxpr(forward)(variables, image(1)).jaxpr)
    else:
        from jax._src.ad_checkpoint import saved_residuals
        concrete = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)

        def loss(params, x):
            logits, _ = model.apply({**concrete, "params": params}, x, train=True,
                                    mutable=["batch_stats"])
            return jnp.sum(logits)
        saved = saved_residuals(loss, concrete["params"], jnp.zeros(image(1).shape))
        working = sum(a.size * a.dtype.itemsize for a, why in saved
                      if "argument" not in str(why))
    return Measurement(accounting, int(param_count), 4 * int(param_count), int(working))


__all__ = ["ACCOUNTINGS", "Measurement", "OURS", "measure"]
