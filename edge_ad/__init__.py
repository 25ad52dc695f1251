"""edge_ad: visual anomaly inspection for factory lines on edge devices.

Importing this package never imports torch: the runtime (ONNX Runtime / TensorRT backends, scoring,
MQTT, calibration) is usable on a device that has no training stack installed.
"""

__version__ = "0.1.0"
