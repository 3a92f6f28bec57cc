"""Running a LiteRT flatbuffer in the two deployment runtimes, and reading the memory they plan.

* TFLite Micro (`tflite-micro`): the microcontroller runtime. Its GreedyMemoryPlanner places
  every activation in one arena; the "head" of the arena is that plan (plus kernel scratch),
  the "tail" the runtime's persistent structs. `print_allocations` reports both on the C
  stderr, which is read here through file descriptor 2.
* LiteRT (`ai-edge-litert`), with its builtin kernels (no XNNPACK delegate): its arena is the
  span of the non-constant tensors' buffers after `allocate_tensors()`, kernel temporaries
  included.

Needs the `deploy` extra. docs/deploy.md has the measured figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import tempfile
from typing import Iterator

import numpy as np

from memnas_jax.arena import RuntimeGraph, RuntimeOp
from memnas_jax.export import ExportError, builtin_code, require

_TFLM_ARENA_PROBE = 64 << 20  # generous: the networks of this project plan a few MB at most
_ALLOCATION = re.compile(r"Arena allocation (total|head|tail) (\d+) bytes")


@dataclasses.dataclass(frozen=True)
class TflmArena:
    """TFLite Micro's arena for one model, in bytes."""

    head_bytes: int  # the planned non-persistent region: activations and kernel scratch
    tail_bytes: int  # persistent runtime structures
    total_bytes: int  # head + tail as allocated
    min_bytes: int  # the smallest arena_size with which the model runs


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Captures what C code writes to file descriptor 2 (the list holds it on exit)."""
    out: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def _tflm_interpreter(flatbuffer: bytes, arena_size: int):
    runtime = require("tflite_micro.python.tflite_micro.runtime")
    return runtime.Interpreter.from_bytes(flatbuffer, arena_size=arena_size)


def _tflm_allocations(flatbuffer: bytes, arena_size: int) -> dict[str, int] | None:
    """{total, head, tail} after one invoke, or None when the model does not fit."""
    with _captured_stderr() as err:
        try:
            interpreter = _tflm_interpreter(flatbuffer, arena_size)
            details = interpreter.get_input_details(0)
            interpreter.set_input(np.zeros(details["shape"], details["dtype"]), 0)
            interpreter.invoke()
            interpreter.print_allocations()
        except RuntimeError:
            interpreter = None
    if interpreter is None:
        return None
    found = dict((k, int(v)) for k, v in _ALLOCATION.findall(err[0]))
    if set(found) != {"total", "head", "tail"}:
        raise RuntimeError(f"TFLite Micro printed no arena report: {err[0][-500:]!r}")
    return found


def tflm_allocations(flatbuffer: bytes) -> dict[str, int]:
    """{"total", "head", "tail"}: TFLite Micro's arena report after one invoke."""
    allocations = _tflm_allocations(flatbuffer, _TFLM_ARENA_PROBE)
    if allocations is None:
        raise ExportError(tflm_failure(flatbuffer))
    return allocations


def tflm_arena(flatbuffer: bytes) -> TflmArena:
    """TFLite Micro's arena for `flatbuffer`: the head and tail it allocates, and the smallest
    arena it runs in (bisected to the byte)."""
    allocations = tflm_allocations(flatbuffer)
    low, high = allocations["head"] - 1, allocations["total"] + 1024  # fails, runs
    while _tflm_allocations(flatbuffer, high) is None:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        if _tflm_allocations(flatbuffer, middle) is None:
            low = middle
        else:
            high = middle
    return TflmArena(allocations["head"], allocations["tail"], allocations["total"], high)


def tflm_failure(flatbuffer: bytes) -> str:
    """Why TFLite Micro cannot run `flatbuffer`, in one line (its own message)."""
    with _captured_stderr() as err:
        try:
            _tflm_interpreter(flatbuffer, _TFLM_ARENA_PROBE)
            reason = "it failed to allocate or run"
        except RuntimeError as e:
            reason = str(e).splitlines()[0]
    printed = [line.strip() for line in err[0].splitlines() if line.strip()]
    detail = "; ".join(printed[:3])
    return f"TFLite Micro cannot run this network: {reason}" + (f" ({detail})" if detail else "")


def _quantizer(details: dict, key: str):
    """(to the tensor's type, back to float32) for an input or output `details` entry; the
    identity for float32, the tensor's scale and zero point for int8."""
    dtype = np.dtype(details["dtype"])
    if dtype == np.float32:
        return (lambda x: np.asarray(x, np.float32)), (lambda x: np.asarray(x, np.float32))
    params = details[key]
    scale = float(np.ravel(params["scales"] if "scales" in params else params[0])[0])
    zero = int(np.ravel(params["zero_points"] if "zero_points" in params else params[1])[0])
    info = np.iinfo(dtype)
    return (lambda x: np.clip(np.round(np.asarray(x) / scale) + zero, info.min, info.max
                              ).astype(dtype),
            lambda x: ((np.asarray(x, np.float32) - zero) * scale).astype(np.float32))


def tflm_predict(flatbuffer: bytes, images: np.ndarray) -> np.ndarray:
    """Logits of TFLite Micro for float32 NHWC `images`, one image at a time (an int8 model's
    input is quantized and its output dequantized with the tensors' own scales)."""
    interpreter = _tflm_interpreter(flatbuffer, _TFLM_ARENA_PROBE)
    to_input, _ = _quantizer(interpreter.get_input_details(0), "quantization_parameters")
    _, from_output = _quantizer(interpreter.get_output_details(0), "quantization_parameters")
    out = []
    for image in np.asarray(images, np.float32):
        interpreter.set_input(to_input(image[None]), 0)
        interpreter.invoke()
        out.append(from_output(np.array(interpreter.get_output(0)))[0])
    return np.stack(out)


def _litert_interpreter(flatbuffer: bytes, delegates: bool):
    litert = require("ai_edge_litert.interpreter")
    resolver = (litert.OpResolverType.AUTO if delegates
                else litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter = litert.Interpreter(model_content=flatbuffer,
                                     experimental_op_resolver_type=resolver, num_threads=1)
    interpreter.allocate_tensors()
    return interpreter


def litert_arena_bytes(flatbuffer: bytes) -> int:
    """LiteRT's planned arena with its builtin kernels: the address span of the non-constant
    tensors' buffers (kernel temporaries included)."""
    interpreter = _litert_interpreter(flatbuffer, delegates=False)
    constant = _constant_tensors(flatbuffer)
    low, high = None, None
    for detail in interpreter.get_tensor_details():
        index = detail["index"]
        if index in constant or not np.prod(detail["shape"]):
            continue
        try:
            view = interpreter.tensor(index)()
        except ValueError:  # a shapeless temporary slot
            continue
        start = view.__array_interface__["data"][0]
        low = start if low is None else min(low, start)
        high = start + view.nbytes if high is None else max(high, start + view.nbytes)
    return 0 if low is None else high - low


def _constant_tensors(flatbuffer: bytes) -> set[int]:
    schema = require("ai_edge_litert.schema_py_generated")
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    subgraph = model.Subgraphs(0)
    return {i for i in range(subgraph.TensorsLength())
            if model.Buffers(subgraph.Tensors(i).Buffer()).DataLength() > 0}


def litert_predict(flatbuffer: bytes, images: np.ndarray, delegates: bool = True) -> np.ndarray:
    """Logits of LiteRT for float32 NHWC `images`, one image at a time (XNNPACK when
    `delegates`, else the builtin kernels)."""
    interpreter = _litert_interpreter(flatbuffer, delegates)
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    to_input, _ = _quantizer(source, "quantization_parameters")
    _, from_output = _quantizer(target, "quantization_parameters")
    out = []
    for image in np.asarray(images, np.float32):
        interpreter.set_tensor(source["index"], to_input(image[None]))
        interpreter.invoke()
        out.append(from_output(interpreter.get_tensor(target["index"]))[0])
    return np.stack(out)


def runtime_graph(flatbuffer: bytes) -> RuntimeGraph:
    """The graph of subgraph 0 of `flatbuffer` as `arena.RuntimeGraph`: its non-constant
    tensors (constants get size 0) and its ops in order. Kernel scratch is not in the file."""
    schema = require("ai_edge_litert.schema_py_generated")
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    itemsize = {schema.TensorType.FLOAT32: 4, schema.TensorType.INT32: 4,
                schema.TensorType.INT64: 8, schema.TensorType.INT8: 1,
                schema.TensorType.UINT8: 1, schema.TensorType.INT16: 2}
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    subgraph = model.subgraphs[0]
    sizes, tensor_names = [], []
    for tensor in subgraph.tensors:
        data = model.buffers[tensor.buffer].data
        constant = data is not None and len(data) > 0
        shape = [] if tensor.shape is None else [int(d) for d in tensor.shape]
        sizes.append(0 if constant else math.prod(shape) * itemsize[tensor.type])
        tensor_names.append(tensor.name.decode() if isinstance(tensor.name, bytes)
                            else str(tensor.name))
    ops = []
    for op in subgraph.operators:
        kind = names[builtin_code(model.operatorCodes[op.opcodeIndex])]
        inputs = tuple(int(t) for t in op.inputs if t >= 0 and sizes[t] > 0)
        ops.append(RuntimeOp(kind, inputs, int(op.outputs[0])))
    return RuntimeGraph(tuple(sizes), tuple(tensor_names), tuple(ops),
                              tuple(int(t) for t in subgraph.inputs),
                              tuple(int(t) for t in subgraph.outputs))


__all__ = ["TflmArena", "litert_arena_bytes", "litert_predict", "runtime_graph", "tflm_allocations",
           "tflm_arena", "tflm_failure", "tflm_predict"]
