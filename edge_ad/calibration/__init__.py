"""On-device recalibration, drift detection and safe model updates (no torch needed).

- :func:`recalibrate` refits map normalization, threshold and (Gaussian model) the Gaussian statistics
  on new normal frames, leaves likely defects out, writes a new calibration version; :func:`rollback`
  puts an older version back, :func:`prune_history` deletes old ones; :func:`collect_frames` reads frames
  from a folder or a source URI.
- :class:`DriftMonitor` compares the scores of OK parts with the calibration's normal distribution.
- :func:`pack_bundle` / :func:`install_bundle` / :func:`rollback_model` / :class:`HealthWatch`: bundle
  archives with sha256 and signatures, golden-set validation, atomic switch, rollback after a failed
  health check.

See docs/calibration.md.
"""

from .collect import collect_frames
from .deploy import (Deployment, GoldenLimits, HealthLimits, HealthVerdict, HealthWatch, InstallResult,
                     check_golden, confirm, current_path, deployment, install_bundle, judge_health,
                     rollback_model)
from .drift import DriftMonitor, DriftState
from .package import PackageInfo, extract_archive, generate_ed25519, pack_bundle, read_index
from .refit import CalibrationResult, Excluded, PruneResult, prune_history, recalibrate, robust_z, rollback

__all__ = [
    "recalibrate", "rollback", "prune_history", "collect_frames", "CalibrationResult", "Excluded", "PruneResult",
    "robust_z",
    "DriftMonitor", "DriftState",
    "pack_bundle", "read_index", "extract_archive", "generate_ed25519", "PackageInfo",
    "install_bundle", "check_golden", "rollback_model", "confirm", "deployment", "current_path",
    "Deployment", "InstallResult", "GoldenLimits", "HealthLimits", "HealthVerdict", "HealthWatch", "judge_health",
]
