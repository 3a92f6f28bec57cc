"""Memory of an inference network: parameters plus peak live activations (docs/method.md §5).

Three estimators share one liveness engine (`schedule`):

* `memory_report(arch, skeleton)`: the MemNAS network at the granularity of the paper's
  lifetime figure (network input, every branch output, every cell output, every block output,
  stem and head tensors), real shapes, the whole network. Pure Python, no tracing: the search
  filters candidates by it before compiling anything.
* `analyze(fn, *args)`: the same accounting for any jax function, read off its jaxpr (one node
  per equation, sub-jaxprs of jit / custom_jvp / custom_vjp / remat calls inlined).
* `memory_report(..., convention="deployed")`: what TFLite Micro's memory planner allocates
  for the network exported to LiteRT (`memnas_jax.deployed`, `memnas_jax.arena`): the graph the
  runtime runs (BatchNorm folded, explicit pad copies, concatenation buffers) planned as its
  greedy planner does. Equal to the runtime's arena head, byte for byte (docs/deploy.md).
* `paper_proxy(feature)`: a literal port of the authors' `Network.cal_weight()` / `cal_in()`
  (C = 32, block 1 only for the working memory, their quirks included), to reproduce the
  paper's curves.

Liveness (docs/method.md §5). Tensors are scheduled as soon as possible: inputs at
step 1, every other tensor one step after its latest input. A tensor is released after its last
consumer; an output of the graph is kept to the end. Two ways to count step t:

* "paper": the tensors born at t plus the earlier ones whose last consumer runs *after* t (the
  lifetime figure: inputs consumed at t are already gone at t);
* "strict": an op's inputs and its output are live together (inputs whose last consumer runs
  at t still count at t).

Working memory is the peak over steps of the summed bytes of the live tensors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

from memnas_jax import arena as arena_lib
from memnas_jax import deployed as deployed_lib
from memnas_jax import plan as plan_lib
from memnas_jax.arena import RuntimeGraph
from memnas_jax.encoding import Cell
from memnas_jax.paper_proxy import (  # re-exported
    PROXY_CHANNELS,
    PROXY_SIZE,
    paper_proxy,
    paper_proxy_trace,
)
from memnas_jax.space import Skeleton

MB = 1e6  # decimal megabytes, as the paper's tables: every table and plot of memory uses it
LIVENESS_CONVENTIONS = ("paper", "strict")
CONVENTIONS = (*LIVENESS_CONVENTIONS, "deployed")


def _check_convention(convention: str, allowed: tuple[str, ...] = LIVENESS_CONVENTIONS) -> None:
    if convention not in allowed:
        extra = (" (\"deployed\" needs a MemNAS architecture: memory_report)"
                 if convention == "deployed" else "")
        raise ValueError(f"unknown convention {convention!r}; use one of {allowed}{extra}")


# ---------------------------------------------------------------------------------------------
# The liveness engine


class TensorNode(NamedTuple):
    """One tensor of a dataflow graph: its size and the (earlier) tensors it is computed from."""

    name: str
    nbytes: int
    inputs: tuple[int, ...] = ()  # indices into the node list; () = a graph input


@dataclasses.dataclass(frozen=True)
class Schedule:
    """An ASAP schedule of a graph's live tensors (dead tensors already dropped).

    birth[i]: step at which tensor i is produced (graph inputs: 1); release[i]: step of its last
    consumer, `num_steps + 1` for a graph output, `birth[i]` for a tensor nobody reads.
    """

    names: tuple[str, ...]
    nbytes: tuple[int, ...]
    birth: tuple[int, ...]
    release: tuple[int, ...]
    num_steps: int

    def _last_live_step(self, i: int, convention: str) -> int:
        # "paper" drops a tensor at its last consumer's step, "strict" one step later.
        end = self.release[i] - 1 if convention == "paper" else self.release[i]
        return max(self.birth[i], min(end, self.num_steps))

    def live_bytes(self, convention: str = "paper") -> np.ndarray:
        """Summed bytes of the live tensors at steps 1..num_steps (index t - 1)."""
        _check_convention(convention)
        delta = np.zeros(self.num_steps + 2, dtype=np.int64)
        for i, size in enumerate(self.nbytes):
            delta[self.birth[i]] += size
            delta[self._last_live_step(i, convention) + 1] -= size
        return np.cumsum(delta)[1:-1]

    def live_tensors(self, step: int, convention: str = "paper") -> tuple[str, ...]:
        _check_convention(convention)
        return tuple(name for i, name in enumerate(self.names)
                     if self.birth[i] <= step <= self._last_live_step(i, convention))

    def peak(self, convention: str = "paper") -> tuple[int, int]:
        """(peak bytes, first step reaching it)."""
        live = self.live_bytes(convention)
        if live.size == 0:
            return 0, 0
        t = int(np.argmax(live))
        return int(live[t]), t + 1


def schedule(nodes: Sequence[TensorNode], outputs: Iterable[int] | None = None) -> Schedule:
    """ASAP-schedules `nodes` (in topological order: inputs refer to earlier nodes).

    `outputs` (default: the tensors nobody reads) are kept live to the last step; tensors that
    no output depends on are dropped, as a compiler drops dead code.
    """
    n = len(nodes)
    consumers: list[list[int]] = [[] for _ in range(n)]
    for i, node in enumerate(nodes):
        for j in node.inputs:
            if not 0 <= j < i:
                raise ValueError(f"tensor {i} ({node.name!r}) reads tensor {j}, which is not an "
                                 f"earlier tensor: the nodes must be in topological order")
            consumers[j].append(i)
    outputs = ({i for i in range(n) if not consumers[i]} if outputs is None
               else {int(i) for i in outputs})
    if any(not 0 <= i < n for i in outputs):
        raise ValueError(f"output indices {sorted(outputs)} out of range for {n} tensors")

    needed = [False] * n
    for i in outputs:
        needed[i] = True
    for i in range(n - 1, -1, -1):
        if needed[i]:
            for j in nodes[i].inputs:
                needed[j] = True

    birth = [0] * n
    for i, node in enumerate(nodes):
        if needed[i]:
            birth[i] = 1 + max((birth[j] for j in node.inputs), default=0)
    keep = [i for i in range(n) if needed[i]]
    num_steps = max((birth[i] for i in keep), default=0)
    release = {}
    for i in keep:
        uses = [birth[k] for k in consumers[i] if needed[k]]
        if i in outputs:
            uses.append(num_steps + 1)
        release[i] = max(uses, default=birth[i])
    return Schedule(names=tuple(nodes[i].name for i in keep),
                    nbytes=tuple(int(nodes[i].nbytes) for i in keep),
                    birth=tuple(birth[i] for i in keep),
                    release=tuple(release[i] for i in keep), num_steps=num_steps)


# ---------------------------------------------------------------------------------------------
# Reports


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Parameter memory + working memory (peak live activation bytes) of one network.

    working_bytes is the figure of `convention`; both liveness conventions are always
    reported, and the deployed arena where it is known (`memory_report`, not `analyze`).
    peak_step / peak_tensors explain the peak of `convention` (deployed: the time of the
    buffer that ends highest in the arena, and the runtime tensors live then).
    """

    param_count: int
    param_bytes: int
    working_bytes: int
    working_bytes_paper: int
    working_bytes_strict: int
    total_bytes: int
    convention: str
    peak_step: int
    num_steps: int
    num_tensors: int
    peak_tensors: tuple[str, ...]
    working_bytes_deployed: int | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["peak_tensors"] = list(self.peak_tensors)
        return d


def _report(sched: Schedule, param_count: int, param_bytes: int, convention: str,
            deployed: RuntimeGraph | None = None) -> MemoryReport:
    _check_convention(convention, CONVENTIONS if deployed is not None else LIVENESS_CONVENTIONS)
    peaks = {c: sched.peak(c) for c in LIVENESS_CONVENTIONS}
    arena_bytes = None
    if deployed is not None:
        buffers = arena_lib.tflm_buffers(deployed)
        ends = [o + b.size for o, b in zip(arena_lib.greedy_offsets(buffers), buffers)]
        arena_bytes = max(ends, default=0)
    if convention == "deployed":
        top = buffers[ends.index(arena_bytes)] if ends else None
        step = top.first if top else 0
        names = [n for n, size in zip(deployed.tensor_names, deployed.tensor_bytes) if size]
        # tflm_buffers lists the tensors first, in order, then the kernels' scratch.
        working, live = arena_bytes, tuple(n for n, b in zip(names, buffers)
                                           if b.first <= step <= b.last)
        num_steps, num_tensors = len(deployed.ops), len(names)
    else:
        working, step = peaks[convention]
        live = sched.live_tensors(step, convention) if step else ()
        num_steps, num_tensors = sched.num_steps, len(sched.names)
    return MemoryReport(
        param_count=int(param_count), param_bytes=int(param_bytes), working_bytes=working,
        working_bytes_paper=peaks["paper"][0], working_bytes_strict=peaks["strict"][0],
        total_bytes=int(param_bytes) + working, convention=convention, peak_step=step,
        num_steps=num_steps, num_tensors=num_tensors, peak_tensors=live,
        working_bytes_deployed=arena_bytes)


# ---------------------------------------------------------------------------------------------
# The MemNAS network's tensor graph


class _Graph:
    def __init__(self, batch_size: int, bytes_per_value: int):
        self.nodes: list[TensorNode] = []
        self.scale = batch_size * bytes_per_value

    def add(self, name: str, shape: tuple[int, ...], inputs: Sequence[int] = ()) -> int:
        self.nodes.append(TensorNode(name, math.prod(shape) * self.scale, tuple(inputs)))
        return len(self.nodes) - 1


def network_graph(arch: Iterable[Iterable[Cell]], skeleton: Skeleton, batch_size: int = 1,
                  bytes_per_value: int = 4) -> list[TensorNode]:
    """The tensors of `MemNASNetwork(arch, skeleton)` at the lifetime figure's granularity.

    An op is one node (its internal tensors are not modelled); an identity branch (a removed op
    whose input already has the branch's shape) and a one-cell block concat create no tensor;
    flattening before the head is a view. The last node is the logits.
    """
    plans = plan_lib.network_plan(arch, skeleton)  # validates arch against skeleton
    arch = plan_lib.check_architecture(arch, skeleton)
    g = _Graph(batch_size, bytes_per_value)
    size = skeleton.image_size
    x = g.add("input", (size, size, skeleton.in_channels))
    if skeleton.stem_width:
        size = plans[0].in_size
        x = g.add("stem", (size, size, skeleton.stem_width), [x])
    for b, (plan, cells) in enumerate(zip(plans, arch)):
        nodes, side = [x], plan.out_size
        for j, cell in enumerate(cells):
            branches = []
            for branch in plan.branches[2 * j:2 * j + 2]:
                src = nodes[branch.input_node]
                if branch.op is None and not plan_lib.removed_op_needs_conv(
                        branch.in_channels, branch.width, branch.stride, skeleton.removed_op):
                    branches.append(src)
                else:
                    branches.append(g.add(f"block{b + 1}.cell{j + 1}.op{branch.branch + 1}",
                                          (side, side, branch.width), [src]))
            nodes.append(g.add(f"block{b + 1}.cell{j + 1}", (side, side, plan.node_channels[j + 1]),
                               branches))
        linked = [nodes[j + 1] for j, cell in enumerate(cells) if cell.linked]
        x = (linked[0] if len(linked) == 1 else
             g.add(f"block{b + 1}.out", (side, side, plan.out_channels), linked))
        size = side
    channels = plans[-1].out_channels
    if skeleton.head == "maxpool_dense":
        pooled = size // skeleton.head_pool
        x = g.add("head.pool", (pooled, pooled, channels), [x])
    else:
        x = g.add("head.pool", (channels,), [x])
    g.add("logits", (skeleton.num_classes,), [x])
    return g.nodes


def memory_report(arch: Iterable[Iterable[Cell]], skeleton: Skeleton, batch_size: int = 1,
                  bytes_per_value: int = 4, convention: str = "paper") -> MemoryReport:
    """Parameter + working memory of `MemNASNetwork(arch, skeleton)` in inference.

    Working memory: peak live activation bytes over the whole network (ASAP schedule,
    `convention` "paper" or "strict"), or TFLite Micro's planned arena of the exported network
    ("deployed"; batch 1 is what runtimes run, a larger batch scales every tensor);
    parameters: `plan.param_count` (BatchNorm running statistics excluded) times
    `bytes_per_value`.
    """
    _check_convention(convention, CONVENTIONS)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if (isinstance(bytes_per_value, bool) or not isinstance(bytes_per_value, int)
            or bytes_per_value < 1):
        raise ValueError(f"bytes_per_value must be a positive integer, got {bytes_per_value!r}")
    nodes = network_graph(arch, skeleton, batch_size, bytes_per_value)
    params = plan_lib.param_count(arch, skeleton)
    deployed = deployed_lib.memnas_graph(arch, skeleton, batch_size * bytes_per_value)
    return _report(schedule(nodes, outputs=[len(nodes) - 1]), params, params * bytes_per_value,
                   convention, deployed)


# ---------------------------------------------------------------------------------------------
# Any jax function, from its jaxpr

# Call-like primitives whose body is inlined (the body has the same inputs and outputs as the
# equation). Control flow (cond, while, scan) stays one node.
_INLINED_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
                  "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


def _body(eqn) -> Any | None:
    if eqn.primitive.name not in _INLINED_CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        body = eqn.params.get(key)
        if body is not None:
            body = getattr(body, "jaxpr", body)  # ClosedJaxpr -> Jaxpr; its consts are not inputs
            if len(body.invars) == len(eqn.invars) and len(body.outvars) == len(eqn.outvars):
                return body
    return None


def _nbytes(aval: Any, bytes_per_value: int | None) -> int:
    shape = getattr(aval, "shape", ())
    itemsize = bytes_per_value or np.dtype(aval.dtype).itemsize
    return math.prod(shape) * itemsize


def _jaxpr_graph(jaxpr, activation_invars: Sequence[bool], bytes_per_value: int | None
                 ) -> tuple[list[TensorNode], list[int]]:
    """Tensor nodes of `jaxpr` whose value depends on an activation input (parameter- and
    constant-only values are not activations), and the indices of the activation outputs."""
    from jax.extend.core import DropVar, Literal

    nodes: list[TensorNode] = []

    def walk(jaxpr, env: dict) -> None:
        for eqn in jaxpr.eqns:
            ins = [env[v] for v in eqn.invars if not isinstance(v, Literal) and v in env]
            body = _body(eqn)
            if body is not None:
                inner = {iv: env[ov] for iv, ov in zip(body.invars, eqn.invars)
                         if not isinstance(ov, Literal) and ov in env}
                walk(body, inner)
                for ov, iv in zip(eqn.outvars, body.outvars):
                    if not isinstance(iv, Literal) and iv in inner:
                        env[ov] = inner[iv]
                continue
            if not ins:
                continue
            inputs = tuple(dict.fromkeys(ins))
            for k, v in enumerate(eqn.outvars):
                if isinstance(v, DropVar):
                    continue
                shape = "x".join(map(str, getattr(v.aval, "shape", ())))
                name = f"{len(nodes)}:{eqn.primitive.name}[{shape}]"
                nodes.append(TensorNode(name, _nbytes(v.aval, bytes_per_value), inputs))
                env[v] = len(nodes) - 1

    env = {}
    for k, (v, is_act) in enumerate(zip(jaxpr.invars, activation_invars)):
        if is_act:
            shape = "x".join(map(str, v.aval.shape))
            nodes.append(TensorNode(f"{len(nodes)}:input{k}[{shape}]",
                                    _nbytes(v.aval, bytes_per_value)))
            env[v] = len(nodes) - 1
    walk(jaxpr, env)
    outputs = [env[v] for v in jaxpr.outvars if not isinstance(v, Literal) and v in env]
    return nodes, outputs


def analyze(fn: Callable[..., Any], *args: Any, convention: str = "paper",
            input_argnums: int | Sequence[int] | None = None,
            bytes_per_value: int | None = None) -> MemoryReport:
    """Working-memory accounting of `fn(*args)` from its jaxpr (`jax.make_jaxpr`).

    Nodes are equations (jit / custom_jvp / custom_vjp / remat bodies inlined, so a Flax apply
    is analysed op by op), tensors their outputs with real byte sizes (dtype itemsize, or
    `bytes_per_value` for every value). The positional arguments in `input_argnums` (default:
    the last one) are the activation inputs; the others (e.g. a Flax variables dict) are
    parameters, reported as param_count / param_bytes. Values computed from parameters and
    constants only are not activations. `args` may be arrays or `jax.ShapeDtypeStruct`s.
    """
    import jax

    _check_convention(convention)
    if not args:
        raise ValueError("analyze needs at least one positional argument (the activation input)")
    if input_argnums is None:
        input_argnums = (len(args) - 1,)
    elif isinstance(input_argnums, int):
        input_argnums = (input_argnums,)
    if any(not -len(args) <= a < len(args) for a in input_argnums):
        raise ValueError(f"input_argnums {input_argnums} out of range for {len(args)} arguments")
    input_argnums = tuple(a % len(args) for a in input_argnums)
    if bytes_per_value is not None and bytes_per_value < 1:
        raise ValueError(f"bytes_per_value must be positive, got {bytes_per_value}")

    closed = jax.make_jaxpr(fn)(*args)
    flags, param_count, param_bytes = [], 0, 0
    for a, arg in enumerate(args):
        leaves = jax.tree_util.tree_leaves(arg)
        flags += [a in input_argnums] * len(leaves)
        if a not in input_argnums:
            for leaf in leaves:
                leaf = jax.numpy.asarray(leaf) if not hasattr(leaf, "shape") else leaf
                param_count += math.prod(leaf.shape)
                param_bytes += _nbytes(leaf, bytes_per_value)
    if len(flags) != len(closed.jaxpr.invars):
        raise ValueError(f"{len(flags)} argument leaves but the jaxpr has "
                         f"{len(closed.jaxpr.invars)} inputs")
    nodes, outputs = _jaxpr_graph(closed.jaxpr, flags, bytes_per_value)
    return _report(schedule(nodes, outputs), param_count, param_bytes, convention)


__all__ = [
    "CONVENTIONS", "LIVENESS_CONVENTIONS", "MemoryReport", "PROXY_CHANNELS", "PROXY_SIZE",
    "Schedule", "TensorNode",
    "analyze", "memory_report", "network_graph", "paper_proxy", "paper_proxy_trace",
    "schedule",
]
