"""Model families as plain ``nn.Module`` s (no training loops, downloads or logging here).

Every model takes ``image`` float32 ``[B, 3, H, W]`` RGB in 0..255 and returns a tuple of raw outputs
named by ``module.output_names``. Importing this package imports torch: runtime code must not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InputError

KINDS = ("efficientad-s", "efficientad-m", "fader", "gaussian")


def default_config(kind: str) -> dict[str, Any]:
    if kind in ("efficientad-s", "efficientad-m"):
        return {"teacher": "lite0", "teacher_channels": None}
    if kind == "fader":
        return {"width": 16, "cell": 32, "hint": 8}
    if kind == "gaussian":
        return {"layout": "patch", "dims": 100, "seed": 0}
    raise InputError(f"model '{kind}': expected one of {', '.join(KINDS)}")


GAUSSIAN_LAYOUTS = ("patch", "shared", "image")


def check_model_config(kind: str, config: dict[str, Any] | None, image_size: int | None = None) -> None:
    """The model config a caller sets (``train_bundle(config=)``; bench/accuracy.py ``--config KEY=VALUE``):
    each key one of the kind's (:func:`default_config`; EfficientAD's teacher is ``--teacher``'s, none
    here), each value of its type and range; an :class:`InputError` naming the key and what was expected."""
    keys = {} if kind.startswith("efficientad") else default_config(kind)
    for k, v in (config or {}).items():
        if k not in keys:
            known = ", ".join(sorted(keys)) or "none (its teacher is set by --teacher)"
            raise InputError(f"model config {k}={v!r}: not a {kind} config key; expected one of: {known}")
        if k == "layout":
            if v not in GAUSSIAN_LAYOUTS:
                raise InputError(f"model config layout={v!r}: expected one of {', '.join(GAUSSIAN_LAYOUTS)}")
            continue
        low = 0 if k == "seed" else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise InputError(f"model config {k}={v!r}: expected an integer >= {low}")
        if k in ("cell", "hint") and image_size is not None and image_size % v:
            raise InputError(f"model config {k}={v}: expected a divisor of the image size {image_size}")


MAX_IMAGE_SIZE = 4096   # the manifest schema's bound


def check_image_size(size: int) -> None:
    """Every model (and a distilled teacher) takes square inputs of a multiple of 32 pixels, 64..4096."""
    if not isinstance(size, int) or size % 32 or not 64 <= size <= MAX_IMAGE_SIZE:
        raise InputError(f"image size {size}: expected a multiple of 32 from 64 to {MAX_IMAGE_SIZE}")


def build(kind: str, image_size: int | tuple[int, int], config: dict[str, Any] | None = None,
          pretrained: bool = True) -> nn.Module:
    """A fresh model. ``pretrained=False`` skips loading the ImageNet backbone (for loading a checkpoint)."""
    cfg = default_config(kind)
    cfg.update({k: v for k, v in (config or {}).items() if v is not None or k not in cfg})
    size = image_size if isinstance(image_size, int) else int(image_size[0])
    if not isinstance(image_size, int) and int(image_size[0]) != int(image_size[1]):
        raise InputError(f"image size {image_size}: models take square inputs")
    check_image_size(size)
    if kind in ("efficientad-s", "efficientad-m"):
        from .efficientad import EfficientAD

        return EfficientAD(kind[-1], size, cfg["teacher"], cfg.get("teacher_channels"),
                           pretrained_teacher=pretrained)
    if kind == "fader":
        from .fader import FaderNet

        return FaderNet(size, int(cfg["width"]), int(cfg["cell"]), int(cfg["hint"]), weights=pretrained)
    from .gaussian_model import GaussianFeatures

    return GaussianFeatures(size, cfg["layout"], int(cfg["dims"]), int(cfg["seed"]), weights=pretrained)


def load_from_bundle(bundle, device: str = "cpu") -> nn.Module:
    """The bundle's model with its checkpoint weights, in eval mode."""
    ckpt = bundle.file("checkpoint.pt")
    if not ckpt.is_file():
        raise InputError(f"{ckpt}: not found; the torch backend needs the bundle's checkpoint")
    model = build(bundle.kind, bundle.image_size, bundle.model.get("config", {}), pretrained=False)
    state = load_weights(ckpt, "checkpoint")
    state = state.get("model", state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{ckpt}: weights do not fit a {bundle.kind} model: {str(exc)[:300]}") from exc
    return model.to(device).eval()


def load_weights(path, what: str) -> dict:
    """A torch weights file (``weights_only``: no code runs) that must hold a dict; ``what`` names it in
    errors. A corrupt, truncated or foreign file is an InputError naming the file, not a torch traceback."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, EOFError, ...)
        # torch's own messages (a pickle opcode, weights_only advice) do not help here; -vv shows them
        raise InputError(f"{path}: unreadable {what}: not a complete PyTorch weights file written by "
                         f"torch.save ({type(exc).__name__})") from exc
    if not isinstance(obj, dict):
        raise InputError(f"{path}: {what} holds a {type(obj).__name__}, expected a dict of tensors (a state_dict)")
    return obj


def describe(model: nn.Module, kind: str, image_size: int, config: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``model`` section for a built model."""
    return {
        "kind": kind,
        "image_size": [image_size, image_size],
        "outputs": list(model.output_names),
        "map_pad": int(getattr(model, "map_pad", 0)),
        "config": dict(config),
        "params": int(sum(p.numel() for p in model.parameters())),
    }
