"""EfficientAD (Batzner et al., WACV 2024) as a plain nn.Module: teacher, student, autoencoder.

``forward(image)`` (float RGB 0..255, ImageNet normalization inside) returns the raw maps
``(map_st, map_ae)``, each ``[B, 1, h, w]``:

- ``map_st`` = channel mean of (T - S[:C])^2 with the teacher output normalized per channel,
- ``map_ae`` = channel mean of (A - S[C:])^2.

Quantile normalization, combination, padding and upsampling are *not* here: they are calibration,
applied by :mod:`edge_ad.scoring`.

Teachers (``teacher`` in the config):
- ``pdn``: a PDN (S or M) with weights from a file in the public ``teacher_small.pth`` /
  ``teacher_medium.pth`` format (a state_dict of the nn.Sequential) or made by ``edge-ad distill-teacher``;
- ``lite0``: the truncated ImageNet EfficientNet-Lite0 itself (stride-8 and stride-16 features,
  resampled onto the student's grid). Needs no distillation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FEATURE_CHANNELS, pretrained
from .pdn import Autoencoder, pdn, pdn_map_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE0_STAGES = ("s8", "s16")


class Lite0Teacher(nn.Module):
    """Frozen EfficientNet-Lite0 features resampled to the unpadded PDN grid (56x56 at 256x256).

    Lite0 features are upsampled to the padded PDN grid (image/4) and the 4-cell border the unpadded
    PDN loses is cropped, so cell i of the map sits over the same input pixels as the student's cell i.
    """

    def __init__(self, image_size: int, stages: tuple[str, ...] = LITE0_STAGES, weights: bool = True):
        super().__init__()
        from .backbone import EfficientNetLite0

        self.net = pretrained(stages) if weights else EfficientNetLite0(stages)
        self.out_channels = sum(FEATURE_CHANNELS[s] for s in stages)
        self.map_size = pdn_map_size(image_size)
        self.grid = image_size // 4

    def forward(self, image255: torch.Tensor) -> torch.Tensor:
        feats = self.net(image255)
        g = self.grid
        up = [F.interpolate(f, size=(g, g), mode="bilinear", align_corners=False) for f in feats]
        x = torch.cat(up, dim=1)
        c = (g - self.map_size) // 2
        return x[:, :, c:c + self.map_size, c:c + self.map_size]


class EfficientAD(nn.Module):
    output_names = ("map_st", "map_ae")

    def __init__(self, size: str = "s", image_size: int = 256, teacher: str = "lite0",
                 teacher_channels: int | None = None, pretrained_teacher: bool = True):
        super().__init__()
        if size not in ("s", "m"):
            raise ValueError(f"EfficientAD size '{size}': expected 's' or 'm'")
        self.size = size
        self.image_size = image_size
        self.teacher_kind = teacher
        if teacher == "lite0":
            self.teacher = Lite0Teacher(image_size, weights=pretrained_teacher)
            c = self.teacher.out_channels
        elif teacher == "pdn":
            c = teacher_channels or 384
            self.teacher = pdn(size, c)
        else:
            raise ValueError(f"teacher '{teacher}': expected 'lite0' or 'pdn'")
        self.channels = c
        self.student = pdn(size, 2 * c)
        self.autoencoder = Autoencoder(c, image_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("t_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("t_std", torch.ones(1, c, 1, 1))
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @property
    def map_size(self) -> int:
        return pdn_map_size(self.image_size)

    @property
    def map_pad(self) -> int:
        return max((self.image_size // 4 - self.map_size) // 2, 0)

    def normalize(self, image255: torch.Tensor) -> torch.Tensor:
        return (image255 - self.mean) / self.std

    def teacher_features(self, image255: torch.Tensor) -> torch.Tensor:
        """Teacher output normalized per channel (the regression target of the student)."""
        t = self.teacher(image255) if self.teacher_kind == "lite0" else self.teacher(self.normalize(image255))
        return (t - self.t_mean) / self.t_std

    def forward(self, image: torch.Tensor):
        x = self.normalize(image)
        t = self.teacher_features(image)
        s = self.student(x)
        a = self.autoencoder(x)
        c = self.channels
        map_st = ((t - s[:, :c]) ** 2).mean(dim=1, keepdim=True)
        map_ae = ((a - s[:, c:]) ** 2).mean(dim=1, keepdim=True)
        return map_st, map_ae
