"""Post-training int8 quantization of an exported network (weights and activations int8,
calibrated on representative images), with `ai-edge-quantizer` (the deploy extra).

The quantizer stores large constant buffers after the flatbuffer (by offset), which TFLite Micro
does not read: it would plan them as activations. `inline_buffers` moves them back inside.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from memnas_jax.export import INPUT_NAME, SIGNATURE, require


def int8_flatbuffer(flatbuffer: bytes, calibration_images: Iterable[np.ndarray]) -> bytes:
    """`flatbuffer` (float32) quantized to int8 weights and activations (per-channel weights,
    int8 input and output), its activation ranges calibrated on `calibration_images` (float32
    (H, W, C) images as the network takes them)."""
    quantizer = require("ai_edge_quantizer.quantizer")
    recipe = require("ai_edge_quantizer.recipe")
    q = quantizer.Quantizer(flatbuffer, recipe.static_wi8_ai8())
    calibration = q.calibrate({SIGNATURE: [{INPUT_NAME: np.asarray(x, np.float32)[None]}
                                           for x in calibration_images]})
    return inline_buffers(bytes(q.quantize(calibration).quantized_model))


def inline_buffers(flatbuffer: bytes) -> bytes:
    """`flatbuffer` with the buffers stored after it (offset, size) moved inside it."""
    import flatbuffers
    schema = require("ai_edge_litert.schema_py_generated")
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    moved = 0
    for buffer in model.buffers:
        if (buffer.data is None or len(buffer.data) == 0) and buffer.offset > 1 and buffer.size:
            buffer.data = np.frombuffer(flatbuffer[buffer.offset:buffer.offset + buffer.size],
                                        np.uint8)
            buffer.offset, buffer.size = 0, 0
            moved += 1
    if not moved:
        return flatbuffer
    builder = flatbuffers.Builder(len(flatbuffer) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


__all__ = ["inline_buffers", "int8_flatbuffer"]
