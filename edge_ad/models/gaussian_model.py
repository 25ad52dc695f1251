"""The Gaussian model's graph: frozen EfficientNet-Lite0 features, ready for a Gaussian head.

``forward(image)`` returns ``(feat,)``:
- layouts ``patch`` / ``shared`` (PaDiM-like): stride-8 and stride-16 features (stride 16 upsampled),
  concatenated (152 channels), averaged over 3x3 neighbourhoods (local context, as in PatchCore),
  then a fixed random subset of ``dims`` channels (PaDiM's dimensionality reduction) -> ``[B, d, H/8, W/8]``.
- layout ``image`` (after Rippel et al. 2020): each stage (stride 8, 16, 32) globally averaged,
  concatenated -> ``[B, 472, 1, 1]``, with ONE joint Gaussian over the 472 values. Rippel et al. fit one
  Gaussian per level (nine EfficientNet-B4 levels) and sum the distances; a joint Gaussian with
  Ledoit-Wolf shrinkage also models the correlations between stages and keeps one statistic that the
  on-device refit, prior blending and leave-one-out screening treat like the other layouts.
The Gaussian statistics are applied by :mod:`edge_ad.gaussian` in numpy (calibration data, not weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FEATURE_CHANNELS, pretrained, EfficientNetLite0


class GaussianFeatures(nn.Module):
    output_names = ("feat",)

    def __init__(self, image_size: int = 256, layout: str = "patch", dims: int = 100, seed: int = 0,
                 weights: bool = True):
        super().__init__()
        self.layout = layout
        self.image_size = image_size
        stages = ("s8", "s16", "s32") if layout == "image" else ("s8", "s16")
        self.net = pretrained(stages) if weights else EfficientNetLite0(stages)
        total = sum(FEATURE_CHANNELS[s] for s in stages)
        if layout == "image":
            idx = torch.arange(total)
        else:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(total, generator=g)[: min(dims, total)].sort().values
        self.register_buffer("index", idx, persistent=True)

    @property
    def dims(self) -> int:
        return int(self.index.numel())

    @property
    def map_pad(self) -> int:
        return 0

    def forward(self, image: torch.Tensor):
        feats = self.net(image)
        if self.layout == "image":
            return (torch.cat([f.mean(dim=(2, 3), keepdim=True) for f in feats], dim=1),)
        h, w = feats[0].shape[-2:]
        x = torch.cat([feats[0], F.interpolate(feats[1], size=(h, w), mode="bilinear", align_corners=False)], 1)
        x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        return (x.index_select(1, self.index),)
