"""Compile: torch -> ONNX export, INT8 / FP16 quantization, the accuracy guard, TensorRT engines.

- :func:`edge_ad.compile.export.export_bundle`      torch module -> ``model.onnx`` (called by ``edge-ad train``)
- :func:`edge_ad.compile.quantize.quantize_bundle`  ``model.int8.onnx`` + ``model.int8-u8.onnx`` / ``model.fp16.onnx``
- :func:`edge_ad.compile.guard.run_guard`           quantized or compiled vs FP32, ``quant_report.json``
- :func:`edge_ad.compile.tensorrt.compile_bundle`   TensorRT engine in ``engines/``, guarded

``import torch`` happens only inside export; quantization and the guard need only onnx / onnxruntime.
"""

# ONNX opsets ``edge-ad export`` accepts: every model exports at 11..23 (torch 2.13, dynamo=False; the
# bilinear / nearest upsampling needs 11), and the INT8 graphs' per-channel Q/DQ needs 13. 23 is torch's
# ONNX_MAX_OPSET; an older torch refuses the newest with a clear message.
MIN_OPSET = 13
MAX_OPSET = 23
