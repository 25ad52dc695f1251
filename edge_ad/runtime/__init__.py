"""Runtime: frame sources, inference backends, the inspection pipeline and telemetry."""
