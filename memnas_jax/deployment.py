"""Deploying a network: export it, run it in TFLite Micro and LiteRT, and measure what they plan
against our prediction (`experiments/export.py`, `benchmarks/deploy_memory.py`, the `tflm`
accounting). Needs the `deploy` extra for everything that runs a runtime.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from memnas_jax import arena, deployed, memory
from memnas_jax.encoding import Architecture, random_architecture
from memnas_jax.space import Skeleton, cifar_skeleton


@dataclasses.dataclass(frozen=True)
class Network:
    """A network to deploy: a MemNAS architecture on a skeleton, or a baseline by name."""

    name: str
    arch: Architecture | None = None
    skeleton: Skeleton | None = None
    baseline: str | None = None

    def model(self) -> Any:
        from memnas_jax import baselines, network
        if self.baseline is not None:
            return baselines.baseline_model(self.baseline, self.num_classes)
        return network.MemNASNetwork(self.arch, self.skeleton)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.baseline is not None:
            return (32, 32, 3)
        return (self.skeleton.image_size, self.skeleton.image_size, self.skeleton.in_channels)

    @property
    def num_classes(self) -> int:
        return 10 if self.skeleton is None else self.skeleton.num_classes

    def runtime_graph(self) -> arena.RuntimeGraph:
        """The graph we predict the runtime executes (`memnas_jax.deployed`)."""
        if self.baseline is not None:
            return deployed.baseline_graph(self.baseline, self.num_classes)
        return deployed.memnas_graph(self.arch, self.skeleton)

    def memory(self) -> memory.MemoryReport | None:
        """Our accounting of a MemNAS network (None for a baseline)."""
        if self.arch is None:
            return None
        return memory.memory_report(self.arch, self.skeleton)


def numpy_variables(model: Any, image_shape: tuple[int, ...], seed: int = 0) -> Any:
    """Random variables of `model` drawn with numpy (no XLA compile): weights N(0, 0.1),
    BatchNorm variances near 1. For memory and conversion checks, not for accuracy."""
    import jax
    import jax.numpy as jnp
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                 jnp.zeros((1, *image_shape)), train=False))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if "var" in jax.tree_util.keystr(path):
            return np.abs(rng.normal(1.0, 0.1, leaf.shape)).astype(np.float32)
        return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, abstract)


def fuzz_networks(count: int, seed: int = 0) -> list[Network]:
    """`count` random MemNAS networks covering the search space and the skeleton's options:
    every op, add and concat cells, unlinked cells, removed ops of both styles, widths 8-32
    (uniform and doubling), both heads, with and without a stem (stride 1 or 2)."""
    networks = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        width = int(rng.choice([8, 12, 16, 24, 32]))
        stem = int(rng.choice([0, 0, 1, 2]))  # none (the authors'), stride 1, stride 2
        skeleton = cifar_skeleton(
            width, "doubling" if width <= 16 and rng.random() < 0.3 else "uniform",
            removed_op=str(rng.choice(["identity", "conv1x1"])),
            stem_width=width if stem else 0, stem_stride=max(stem, 1)
        ).replace(head=str(rng.choice(["maxpool_dense", "global_avg_dense"])))
        networks.append(Network(f"fuzz{i:03d}", random_architecture(rng), skeleton))
    return networks


def baseline_networks(names: Sequence[str] = ("resnet20", "resnet56", "resnet110",
                                              "mobilenetv2")) -> list[Network]:
    return [Network(name, baseline=name) for name in names]


@dataclasses.dataclass(frozen=True)
class Measured:
    """One network's arenas: measured by the runtimes and predicted, in bytes."""

    name: str
    tflm_arena_head_bytes: int
    tflm_arena_min_bytes: int | None
    tflm_arena_tail_bytes: int
    litert_arena_bytes: int | None
    predicted_working_bytes: int  # `arena.tflm_arena_bytes` of our predicted graph
    predicted_graph_matches: bool  # the predicted op sequence is the flatbuffer's
    param_bytes: int  # constant data in the flatbuffer (BatchNorm folded)
    flatbuffer_bytes: int
    paper_working_bytes: int | None = None  # our liveness conventions (MemNAS networks)
    strict_working_bytes: int | None = None

    @property
    def relative_error(self) -> float:
        return abs(self.predicted_working_bytes - self.tflm_arena_head_bytes) / max(
            self.tflm_arena_head_bytes, 1)

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), relative_error=self.relative_error)


def flatbuffer_constant_bytes(flatbuffer: bytes) -> int:
    """Bytes of the constant tensors (weights, biases, shapes) stored in `flatbuffer`."""
    from memnas_jax.export import require
    schema = require("ai_edge_litert.schema_py_generated")
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    subgraph = model.Subgraphs(0)
    return sum(model.Buffers(subgraph.Tensors(i).Buffer()).DataLength()
               for i in range(subgraph.TensorsLength()))


def measure(network: Network, flatbuffer: bytes, *, min_arena: bool = True,
            litert: bool = True) -> Measured:
    """Runs `flatbuffer` (the export of `network`) in TFLite Micro (and LiteRT) and compares
    the arena it plans with our prediction. `min_arena` bisects the smallest arena."""
    from memnas_jax import runtimes
    if min_arena:
        tflm = runtimes.tflm_arena(flatbuffer)
        head, tail, smallest = tflm.head_bytes, tflm.tail_bytes, tflm.min_bytes
    else:
        allocations = runtimes.tflm_allocations(flatbuffer)
        head, tail, smallest = allocations["head"], allocations["tail"], None
    predicted = network.runtime_graph()
    actual = runtimes.runtime_graph(flatbuffer)
    report = network.memory()
    return Measured(
        name=network.name, tflm_arena_head_bytes=head, tflm_arena_min_bytes=smallest,
        tflm_arena_tail_bytes=tail,
        litert_arena_bytes=runtimes.litert_arena_bytes(flatbuffer) if litert else None,
        predicted_working_bytes=arena.tflm_arena_bytes(predicted),
        predicted_graph_matches=(predicted.op_kinds() == actual.op_kinds()
                                 and _activation_sizes(predicted) == _activation_sizes(actual)),
        param_bytes=flatbuffer_constant_bytes(flatbuffer), flatbuffer_bytes=len(flatbuffer),
        paper_working_bytes=report.working_bytes_paper if report else None,
        strict_working_bytes=report.working_bytes_strict if report else None)


def _activation_sizes(graph: arena.RuntimeGraph) -> list[int]:
    return [graph.tensor_bytes[op.output] for op in graph.ops]


def export_network(network: Network, variables: Any = None, seed: int = 0) -> bytes:
    """The LiteRT flatbuffer of `network` (random numpy variables unless given)."""
    from memnas_jax import export
    model = network.model()
    if variables is None:
        variables = numpy_variables(model, network.image_shape, seed)
    return export.to_flatbuffer(export.inference_fn(model, variables),
                                (1, *network.image_shape))


def max_abs_diff(forward: Callable, predict: Callable, images: np.ndarray) -> float:
    """The largest |JAX - runtime| over the logits of `images`."""
    return float(np.max(np.abs(np.asarray(forward(images)) - predict(images))))


def summary(rows: Sequence[Measured]) -> dict:
    """The fuzz figures: networks, exact matches, worst relative error."""
    return dict(networks=len(rows),
                exact=sum(r.predicted_working_bytes == r.tflm_arena_head_bytes for r in rows),
                graphs_matching=sum(r.predicted_graph_matches for r in rows),
                worst_relative_error=max((r.relative_error for r in rows), default=math.nan))


__all__ = ["Measured", "Network", "baseline_networks", "export_network",
           "flatbuffer_constant_bytes", "fuzz_networks", "max_abs_diff", "measure",
           "numpy_variables", "summary"]
