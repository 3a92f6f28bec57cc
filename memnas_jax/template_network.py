"""The template network: any candidate of a `RoundTemplate`, chosen by its `code` (arrays).

`TemplateNetwork(template)(x, code, train)` computes what `MemNASNetwork(arch)` computes for
`code = template.code(arch)`, with the candidate's parameters in the leading rows of the
template's (`embed_variables` / `extract_variables`; every other entry zero, and it stays zero:
its gradient is zero, so SGD, momentum, weight decay and Adam leave it there).

Where a slot has several alternatives, `selection` says how one is picked:

* "select": every alternative runs and `jnp.where` keeps the chosen one. This is what `jax.vmap`
  over candidates needs. The input of an unchosen alternative is zeroed by `jnp.where` too, so
  nothing it computes (a NaN included) reaches the output or flows back into the gradient.
* "switch": `lax.switch` (flax `nn.switch`) runs only the chosen one: one candidate at a time
  (no vmap), at the cost of the candidate alone; what a CPU wants.

Node choices, the add/concat choice and the block output gather are selects or gathers in both.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memnas_jax.encoding import Architecture
from memnas_jax.network import abstract_variables, input_shape
from memnas_jax.ops import ConvBN, OpSettings, make_op
from memnas_jax.template import (
    BlockSlot,
    BranchSlot,
    RoundTemplate,
    branch_key,
    concat_key,
    output_key,
)

SELECTIONS = ("select", "switch")
Dtype = Any
Code = Mapping[str, jax.Array]


def _pad_channels(x: jax.Array, channels: int) -> jax.Array:
    extra = channels - x.shape[-1]
    return x if not extra else jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, extra),))


def _choose(index: jax.Array, options: list[jax.Array]) -> jax.Array:
    """options[index] by a chain of selects (never a multiply: a NaN elsewhere stays there)."""
    out = options[0]
    for i, option in enumerate(options[1:], start=1):
        out = jnp.where(index == i, option, out)
    return out


class _Identity(nn.Module):
    """The removed op's identity on a compact layout: the candidate's width channels."""

    width: int

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        return x[..., :self.width]


class Branch(nn.Module):
    """One branch slot: its input choice, then its op alternatives (`alternatives_<a>`)."""

    slot: BranchSlot
    width: int
    settings: OpSettings
    selection: str
    keys: tuple[str, str]  # (alternative key, node key prefix)

    def _alternative(self, a: int, **module_kwargs) -> nn.Module:
        alt = self.slot.alternatives[a]
        if alt.is_identity:
            return _Identity(self.width, **module_kwargs)
        settings = (dataclasses.replace(self.settings, removed_op="conv1x1") if alt.op is None
                    else self.settings)
        return make_op(alt.op, self.width, alt.stride, settings, **module_kwargs)

    @nn.compact
    def __call__(self, nodes: list[jax.Array], code: Code, train: bool) -> jax.Array:
        inputs = []
        for group in self.slot.groups:
            options = [_pad_channels(nodes[n], group.channels) for n in group.nodes]
            inputs.append(options[0] if len(options) == 1 else
                          _choose(code[f"{self.keys[1]}{group.stride}"], options))
        groups = [self.slot.groups.index(self.slot.group_of(a)) for a in self.slot.alternatives]
        if not self.slot.selected:
            return self._alternative(0, name="alternatives_0")(inputs[groups[0]], train)
        index = code[self.keys[0]]
        if self.selection == "switch" and not self.is_initializing():
            return self._switch(index, [inputs[g] for g in groups], train)
        outputs = []
        for a, g in enumerate(groups):
            x = jnp.where(index == a, inputs[g], jnp.zeros((), inputs[g].dtype))
            outputs.append(self._alternative(a, name=f"alternatives_{a}")(x, train))
        return _choose(index, outputs)

    def _switch(self, index: jax.Array, inputs: list[jax.Array], train: bool) -> jax.Array:
        """`lax.switch` over the alternatives, applied functionally on the variables their
        submodules made at init (so "select" and "switch" share parameters, and their
        initialisation): only the chosen one runs and only its statistics change. An absent
        cell's index past the alternatives runs the last one, whose output nothing reads."""
        names = [f"alternatives_{a}" for a in range(len(inputs))]
        modules = [self._alternative(a, parent=None) for a in range(len(inputs))]
        params = [self.get_variable("params", n, {}) for n in names]
        stats = [self.get_variable("batch_stats", n, {}) for n in names]

        def run(a, operands):
            inputs_, values = operands
            y, updates = modules[a].apply({"params": params[a], "batch_stats": values[a]},
                                          inputs_[a], train, mutable=["batch_stats"])
            values = list(values)
            values[a] = updates.get("batch_stats", values[a])
            return y, values
        y, new_stats = jax.lax.switch(
            index, [functools.partial(run, a) for a in range(len(modules))], (inputs, stats))
        if train and self.is_mutable_collection("batch_stats"):
            for name, value in zip(names, new_stats):
                if value:
                    self.put_variable("batch_stats", name, value)
        return y


class TemplateBlock(nn.Module):
    slot: BlockSlot
    index: int  # 0-based block index (the code's keys)
    settings: OpSettings
    selection: str

    @nn.compact
    def __call__(self, x: jax.Array, code: Code, train: bool) -> jax.Array:
        b, slot = self.index, self.slot
        nodes = [x]
        for j, cell in enumerate(slot.cells):
            outs = [Branch(branch, slot.width, self.settings, self.selection,
                           (branch_key(b, j, k, "alternative"), branch_key(b, j, k, "node_s")),
                           name=f"cell{j + 1}_op{k + 1}")(nodes, code, train)
                    for k, branch in enumerate(cell.branches)]
            added = _pad_channels(outs[0] + outs[1], cell.channels)
            if cell.combines == (False,):
                nodes.append(added)
            elif cell.combines == (True,):
                nodes.append(jnp.concatenate(outs, axis=-1))
            else:
                nodes.append(jnp.where(code[concat_key(b, j)] == 1,
                                       jnp.concatenate(outs, axis=-1), added))
        cells = nodes[1:]
        if slot.static_links is not None:
            linked = [c for c, link in zip(cells, slot.static_links) if link]
            return linked[0] if len(linked) == 1 else jnp.concatenate(linked, axis=-1)
        stacked = jnp.concatenate([*cells, jnp.zeros_like(cells[0][..., :1])], axis=-1)
        return jnp.take(stacked, code[output_key(b)], axis=-1)


class PaddedHead(nn.Module):
    """The Dense head on (positions, channels) features: kernel (positions, channels, classes),
    so a candidate's narrower input sits in leading rows (`MemNASNetwork`'s head kernel,
    reshaped)."""

    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*x.shape[1:], self.num_classes), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.num_classes,),
                          jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.einsum("npc,pck->nk", x, kernel) + bias


class TemplateNetwork(nn.Module):
    """`MemNASNetwork` for every candidate of `template`: apply with `code` =
    `template.code(arch)` (int arrays). Same signature otherwise."""

    template: RoundTemplate
    depthwise_impl: str = "xla"
    dtype: Dtype = jnp.float32
    selection: str = "select"

    @nn.compact
    def __call__(self, x: jax.Array, code: Code, train: bool = False) -> jax.Array:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection {self.selection!r} is not one of {SELECTIONS}")
        sk = self.template.skeleton
        chex.assert_shape(x, (None, sk.image_size, sk.image_size, sk.in_channels))
        expected = self.template.code(None)
        chex.assert_trees_all_equal_shapes(  # the template's code, one candidate's (not a pack)
            {k: code[k] for k in expected}, {k: jnp.asarray(v) for k, v in expected.items()})
        settings = OpSettings.from_skeleton(sk, self.depthwise_impl, self.dtype)
        x = jnp.asarray(x, self.dtype)
        if sk.stem_width:
            x = ConvBN(sk.stem_width, (3, 3), sk.stem_stride, settings=settings, name="stem")(
                x, train)
        for b, slot in enumerate(self.template.blocks):
            x = TemplateBlock(slot, b, settings, self.selection, name=f"block{b + 1}")(
                x, code, train)
        if sk.head == "maxpool_dense":
            x = nn.max_pool(x, (sk.head_pool,) * 2, (sk.head_pool,) * 2, "VALID")
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        else:
            x = jnp.mean(x, axis=(1, 2))[:, None, :]
        return PaddedHead(sk.num_classes, self.dtype, name="head")(x).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# A candidate's variables in the template's


def _path_map(template: RoundTemplate, arch: Architecture) -> dict[str, str]:
    """Standalone module path prefix -> template prefix, for every branch of `arch`."""
    renames = {}
    for b, cells in enumerate(arch):
        for j in range(len(cells)):
            for k in range(2):
                a = template.alternative_index(arch, b, j, k)
                renames[f"block{b + 1}/cell{j + 1}_op{k + 1}"] = (
                    f"block{b + 1}/cell{j + 1}_op{k + 1}/alternatives_{a}")
    return renames


def flatten_paths(tree: Mapping) -> dict[str, Any]:
    """{"params": {"block1": {...}}} -> {"params/block1/...": leaf}."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_paths(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def _template_path(path: str, renames: Mapping[str, str]) -> str:
    parts = path.split("/")  # collection, blockB, cellJ_opK, ...
    prefix = "/".join(parts[1:3])
    if prefix in renames:
        return "/".join([parts[0], renames[prefix], *parts[3:]])
    return path


def _head_shape(path: str, shape: tuple[int, ...], template_shape: tuple[int, ...]
                ) -> tuple[int, ...]:
    """A standalone leaf's shape as it sits in the template (the head kernel is 3-D there)."""
    if path.endswith("head/kernel"):
        positions = template_shape[0]
        return (positions, shape[0] // positions, shape[1])
    return shape


def template_shapes(module: TemplateNetwork) -> dict[str, tuple[int, ...]]:
    """Flat path ("params/block1/...") -> shape of the template's variables (no compute)."""
    return _template_shapes(module.template, module.depthwise_impl,
                            jnp.dtype(module.dtype).name, module.selection)


@functools.lru_cache(maxsize=16)
def _template_shapes(template: RoundTemplate, depthwise_impl: str, dtype: str, selection: str
                     ) -> dict[str, tuple[int, ...]]:
    module = TemplateNetwork(template, depthwise_impl, jnp.dtype(dtype), selection)
    x = jax.ShapeDtypeStruct(input_shape(template.skeleton), module.dtype)
    code = {k: jnp.asarray(v) for k, v in template.code(None).items()}
    variables = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x,
                               code)
    return {path: tuple(leaf.shape) for path, leaf in flatten_paths(variables).items()}


def real_shapes(module: TemplateNetwork, arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Flat template path -> the shape `arch`'s own parameters occupy there (leading rows);
    (0, ...) for entries `arch` does not use."""
    shapes = template_shapes(module)
    own = flatten_paths(abstract_variables(arch, module.template.skeleton,
                                   depthwise_impl=module.depthwise_impl, dtype=module.dtype)[1])
    renames = _path_map(module.template, arch)
    out = {path: (0,) * len(shape) for path, shape in shapes.items()}
    for path, leaf in own.items():
        tpath = _template_path(path, renames)
        out[tpath] = _head_shape(tpath, tuple(leaf.shape), shapes[tpath])
    return out


def embed_variables(module: TemplateNetwork, arch: Architecture, variables: Mapping
                    ) -> dict:
    """`MemNASNetwork(arch)` variables -> template variables (numpy; zeros elsewhere)."""
    shapes = template_shapes(module)
    renames = _path_map(module.template, arch)
    out = {path: np.zeros(shape, np.float32) for path, shape in shapes.items()}
    for path, leaf in flatten_paths(variables).items():
        tpath = _template_path(path, renames)
        leaf = np.asarray(leaf, np.float32)
        leaf = leaf.reshape(_head_shape(tpath, leaf.shape, shapes[tpath]))
        out[tpath][tuple(slice(0, n) for n in leaf.shape)] = leaf
    return unflatten_paths(out)


def extract_variables(module: TemplateNetwork, arch: Architecture, variables: Mapping
                      ) -> dict:
    """Template variables (of one candidate) -> `MemNASNetwork(arch)` variables (numpy)."""
    flat = {path: np.asarray(leaf) for path, leaf in flatten_paths(variables).items()}
    renames = _path_map(module.template, arch)
    own = flatten_paths(abstract_variables(arch, module.template.skeleton,
                                   depthwise_impl=module.depthwise_impl, dtype=module.dtype)[1])
    out = {}
    for path, leaf in own.items():
        tpath = _template_path(path, renames)
        shape = _head_shape(tpath, tuple(leaf.shape), flat[tpath].shape)
        out[path] = flat[tpath][tuple(slice(0, n) for n in shape)].reshape(leaf.shape)
    return unflatten_paths(out)


def mask_to_candidate(variables: Mapping, shapes: Mapping[str, jax.Array]) -> dict:
    """Freshly initialised template variables -> one candidate's initial variables: entries
    outside its real shape (`real_shapes`, as int arrays) zeroed, and kernels rescaled from the
    template's fan-in to the candidate's, so each follows the initialiser the candidate's own
    network would use (flax's lecun_normal: fan-in = all axes but the last)."""
    flat, shapes = flatten_paths(variables), flatten_paths(shapes)
    out = {}
    for path, leaf in flat.items():
        real = shapes[path]
        mask = jnp.ones(leaf.shape, bool)
        for axis, size in enumerate(leaf.shape):
            iota = jax.lax.broadcasted_iota(jnp.int32, leaf.shape, axis)
            mask &= iota < real[axis]
        if path.split("/")[-1] == "kernel":
            fan_in = jnp.prod(real[:-1]).astype(jnp.float32)
            leaf = leaf * jnp.sqrt(math.prod(leaf.shape[:-1]) / jnp.maximum(fan_in, 1.0))
        out[path] = jnp.where(mask, leaf, jnp.zeros((), leaf.dtype))
    return unflatten_paths(out)


__all__ = ["SELECTIONS", "Branch", "PaddedHead", "TemplateBlock", "TemplateNetwork",
           "embed_variables", "extract_variables", "flatten_paths", "mask_to_candidate",
           "real_shapes", "template_shapes", "unflatten_paths"]
