"""A Flax network as a LiteRT (TFLite) flatbuffer: batch 1, float32, inference mode.

JAX -> StableHLO (`jax.export`) -> LiteRT with `litert-converter`, no TensorFlow
(docs/deploy.md). BatchNorm folds into the convolutions and ReLU fuses into them, as the
TFLite converter does. One rewrite after conversion: the paddings of PAD / PADV2 ops are int32
(the converter writes int64 for some, which TFLite Micro's PAD kernel rejects).

Needs the `deploy` extra (`pip install -e ".[deploy]"`).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from memnas_jax.errors import UserError

DEPLOY_EXTRA_HINT = 'pip install -e ".[deploy]"'
INPUT_NAME, OUTPUT_NAME, SIGNATURE = "images", "logits", "serving_default"


class DeployUnavailable(UserError):
    """The deployment packages (the `deploy` extra) are not installed."""


class ExportError(UserError):
    """A network the converter or a runtime cannot take."""


def require(module: str) -> Any:
    """Imports `module` of the deploy extra, or raises a one-line `DeployUnavailable`."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DeployUnavailable(f"{module.split('.')[0]} is not installed ({e}); install the "
                                f"deployment extra: {DEPLOY_EXTRA_HINT}") from None


def inference_fn(model: Any, variables: Any) -> Callable:
    """x -> logits of a linen module called as `(x, train)`, with its variables bound."""
    import jax.numpy as jnp

    def forward(x):
        return jnp.asarray(model.apply(variables, x, train=False), jnp.float32)
    return forward


def to_flatbuffer(forward: Callable, input_shape: tuple[int, ...]) -> bytes:
    """The LiteRT flatbuffer of `forward` (float32 in, float32 out) at `input_shape`."""
    import jax
    import jax.numpy as jnp

    converter = require("litert_converter.converter_api_ext")
    mlir = require("litert_converter.mlir.ir")
    passmanager = require("litert_converter.mlir.passmanager")
    exported = jax.export.export(jax.jit(forward))(jax.ShapeDtypeStruct(input_shape, jnp.float32))
    with mlir.Context() as context:
        converter.prepare_mlir_context(context)
        module = mlir.Module.parse(exported.mlir_module())
        converter.set_signature(module.operation, signature_name=SIGNATURE,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
        options = converter.ConvertToTFLConfig()
        options.model_origin_framework = "JAX"
        try:
            converter.run_convert_to_tfl_passes(module, passmanager.PassManager(), options)
        except ValueError as e:
            raise ExportError(f"the LiteRT converter cannot convert this network: "
                              f"{str(e).splitlines()[0]}") from None
        flatbuffer = bytes(converter.export_flatbuffer_to_bytes(module.operation))
    return int32_paddings(flatbuffer)


def int32_paddings(flatbuffer: bytes) -> bytes:
    """`flatbuffer` with the int64 paddings of its PAD / PADV2 ops stored as int32 (the same
    values; TFLite Micro's PAD kernel reads int32 only)."""
    import flatbuffers
    schema = require("ai_edge_litert.schema_py_generated")
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    pads = {schema.BuiltinOperator.PAD, schema.BuiltinOperator.PADV2}
    changed = False
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            if builtin_code(model.operatorCodes[op.opcodeIndex]) not in pads:
                continue
            tensor = subgraph.tensors[op.inputs[1]]
            buffer = model.buffers[tensor.buffer]
            if tensor.type != schema.TensorType.INT64 or buffer.data is None:
                continue
            values = np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), "<i8")
            buffer.data = np.frombuffer(values.astype("<i4").tobytes(), np.uint8)
            tensor.type = schema.TensorType.INT32
            changed = True
    if not changed:
        return flatbuffer
    builder = flatbuffers.Builder(len(flatbuffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def builtin_code(operator_code: Any) -> int:
    """An OperatorCode's builtin op (the schema keeps small codes in a deprecated field)."""
    return max(int(operator_code.builtinCode), int(operator_code.deprecatedBuiltinCode))


__all__ = ["DEPLOY_EXTRA_HINT", "DeployUnavailable", "ExportError", "builtin_code",
           "inference_fn", "int32_paddings", "require", "to_flatbuffer"]
