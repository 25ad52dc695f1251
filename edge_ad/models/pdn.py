"""EfficientAD's networks: patch description networks (PDN-S / PDN-M) and the autoencoder.

Exactly as in Batzner et al. (WACV 2024, arXiv 2303.14535), Table/Appendix A: no padding at training
and inference (256x256 -> 56x56 maps, receptive field 33x33); ``padding=True`` gives the padded variant
used only for teacher distillation (64x64 maps at 256x256).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pdn_small(out_channels: int = 384, padding: bool = False) -> nn.Sequential:
    p = 1 if padding else 0
    return nn.Sequential(
        nn.Conv2d(3, 128, 4, padding=3 * p), nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(128, 256, 4, padding=3 * p), nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(256, 256, 3, padding=p), nn.ReLU(inplace=True),
        nn.Conv2d(256, out_channels, 4),
    )


def pdn_medium(out_channels: int = 384, padding: bool = False) -> nn.Sequential:
    p = 1 if padding else 0
    return nn.Sequential(
        nn.Conv2d(3, 256, 4, padding=3 * p), nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(256, 512, 4, padding=3 * p), nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(512, 512, 1), nn.ReLU(inplace=True),
        nn.Conv2d(512, 512, 3, padding=p), nn.ReLU(inplace=True),
        nn.Conv2d(512, out_channels, 4), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 1),
    )


def pdn(size: str, out_channels: int, padding: bool = False) -> nn.Sequential:
    return pdn_small(out_channels, padding) if size == "s" else pdn_medium(out_channels, padding)


def pdn_map_size(image_size: int) -> int:
    """Output side of an unpadded PDN (S and M alike): 256 -> 56."""
    s = image_size - 3          # conv 4x4
    s = s // 2                  # avgpool
    s = s - 3                   # conv 4x4
    s = s // 2                  # avgpool
    s = s - 2                   # conv 3x3
    s = s - 3                   # conv 4x4
    return s


class Autoencoder(nn.Module):
    """EfficientAD's autoencoder; the decoder upsamples to fixed sizes scaled to the input size."""

    def __init__(self, out_channels: int = 384, image_size: int = 256, map_size: int | None = None):
        super().__init__()
        self.map_size = map_size or pdn_map_size(image_size)
        self.enc = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, max(image_size // 32, 1)),
        )
        # 256 input: 3, 8, 15, 32, 63, 127 (paper); scaled for other sizes
        scale = image_size / 256.0
        self.up_sizes = [max(int(round(s * scale)), 1) for s in (3, 8, 15, 32, 63, 127)]
        self.dec = nn.ModuleList(nn.Conv2d(64, 64, 4, 1, 2) for _ in range(6))
        self.drop = nn.Dropout(0.2)
        self.tail1 = nn.Conv2d(64, 64, 3, 1, 1)
        self.tail2 = nn.Conv2d(64, out_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.enc(x)
        for size, conv in zip(self.up_sizes, self.dec):
            z = F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)
            z = self.drop(F.relu(conv(z)))
        z = F.interpolate(z, size=(self.map_size, self.map_size), mode="bilinear", align_corners=False)
        z = F.relu(self.tail1(z))
        return self.tail2(z)
