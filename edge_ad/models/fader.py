"""FADeR-style inpainting model (after Park et al., arXiv 2407.04597; no public code — our choices).

Choices, each ours (the paper publishes none of these details):

1. **Single deterministic mask** (EAR-style excision): the input is cut into ``cell``-pixel cells; the
   cells whose pretrained EfficientNet-Lite0 stride-8 feature energy is in the top half of the image
   are masked. Same image -> same mask; no random masks at inference. (EAR uses ViT attention; feature
   energy of a pretrained CNN is our stand-in, as the original design proposal suggested.)
2. **Hint**: masked cells are not blanked but replaced by a coarse mosaic of themselves (each cell
   averaged over ``hint``-pixel blocks), so the network sees colour and rough shape but not detail.
   The mask itself is given as a fourth input channel.
3. **U-Net inpainter**: 3 encoder levels (``width``, 2x, 4x channels; two 3x3 convs each, stride-2
   downsampling), a bottleneck, and a decoder with skip connections.
4. **Attenuation (FADeR)**: each skip connection passes through two 1x1 convolutions (a per-location
   two-layer MLP) with a sigmoid, giving an attenuation in [0, 1] per location that multiplies the skip
   features, so detail of anomalous regions is not copied into the reconstruction.
5. **Training** (``train_fader`` in ``edge_ad/train/loops.py``, anomalies from
   ``planted_anomalies`` in ``edge_ad/train/common.py``): synthetic anomalies are planted into normal images; the
   network reconstructs the clean image. Attenuation targets come from patch-wise reconstruction errors:
   a* = exp(-e / tau) with e the patch-wise error between the corrupted input and the clean target at
   the skip's resolution (1 on normal patches, near 0 on planted ones), with a BCE loss.
6. **Score**: two raw maps, both at stride 4: ``map_pix`` (channel-mean absolute error between input and
   reconstruction, in ImageNet-normalized pixel units, averaged over 4x4 blocks) and ``map_feat``
   (squared distance of EfficientNet-Lite0 stride-8 features of input and reconstruction, resampled).
   Calibration normalizes each by its quantiles and combines them 0.5 / 0.5, like EfficientAD's two maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import EfficientNetLite0, pretrained
from .efficientad import IMAGENET_MEAN, IMAGENET_STD


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Attenuator(nn.Module):
    """Two per-location MLP layers (1x1 convs) -> attenuation in [0, 1]."""

    def __init__(self, channels: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(channels // 2, 8)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, 1, 1)
        nn.init.constant_(self.fc2.bias, 3.0)  # start open (sigmoid(3) = 0.95): plain U-Net behaviour

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x))))


class FaderNet(nn.Module):
    output_names = ("map_pix", "map_feat")

    def __init__(self, image_size: int = 256, width: int = 32, cell: int = 32, hint: int = 8,
                 weights: bool = True):
        super().__init__()
        self.image_size = image_size
        self.cell = cell
        self.hint = hint
        self.backbone = pretrained(("s8",)) if weights else EfficientNetLite0(("s8",))
        w = width
        self.enc1 = _block(4, w)
        self.enc2 = _block(w, 2 * w)
        self.enc3 = _block(2 * w, 4 * w)
        self.mid = _block(4 * w, 8 * w)
        self.up3 = nn.ConvTranspose2d(8 * w, 4 * w, 2, 2)
        self.dec3 = _block(8 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2)
        self.dec2 = _block(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, 2)
        self.dec1 = _block(2 * w, w)
        self.out = nn.Conv2d(w, 3, 1)
        self.att1, self.att2, self.att3 = Attenuator(w), Attenuator(2 * w), Attenuator(4 * w)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    @property
    def map_pad(self) -> int:
        return 0

    # -------------------------------------------------------------- mask and hint
    def mask(self, image255: torch.Tensor) -> torch.Tensor:
        """Deterministic mask ``[B, 1, H, W]`` (1 = excised): top half of cells by feature energy."""
        with torch.no_grad():
            f = self.backbone(image255)[0]
            energy = (f ** 2).mean(dim=1, keepdim=True)
            energy = F.interpolate(energy, size=(self.image_size, self.image_size), mode="nearest")
            cells = F.avg_pool2d(energy, self.cell)  # fixed kernel: exports to ONNX / TensorRT
            flat = cells.flatten(1)
            k = max(flat.shape[1] // 2, 1)
            kth = flat.topk(k, dim=1).values[:, -1:]  # TopK exports to ONNX (median does not)
            m = (flat >= kth).to(flat.dtype).view_as(cells)  # the model's dtype: fp16 runs stay fp16
            return F.interpolate(m, scale_factor=self.cell, mode="nearest")

    def excise(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Masked cells replaced by their coarse mosaic (the hint); mask appended as a channel."""
        coarse = F.interpolate(F.avg_pool2d(x, self.hint), scale_factor=self.hint, mode="nearest")
        return torch.cat([x * (1 - m) + coarse * m, m], dim=1)

    # -------------------------------------------------------------- network
    def reconstruct(self, x: torch.Tensor, m: torch.Tensor):
        """Normalized input ``x`` and mask -> (reconstruction, [attenuations at 3 scales])."""
        e1 = self.enc1(self.excise(x, m))
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        b = self.mid(F.max_pool2d(e3, 2))
        a3, a2, a1 = self.att3(e3), self.att2(e2), self.att1(e1)
        d3 = self.dec3(torch.cat([self.up3(b), e3 * a3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2 * a2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1 * a1], 1))
        return self.out(d1), [a1, a2, a3]

    def forward(self, image: torch.Tensor):
        x = (image - self.mean) / self.std
        m = self.mask(image)
        rec, _ = self.reconstruct(x, m)
        err = (rec - x).abs().mean(dim=1, keepdim=True)
        map_pix = F.avg_pool2d(err, 4)
        rec255 = rec * self.std + self.mean
        fi = self.backbone(image)[0]
        fr = self.backbone(rec255)[0]
        fd = ((fi - fr) ** 2).mean(dim=1, keepdim=True)
        map_feat = F.interpolate(fd, size=map_pix.shape[-2:], mode="bilinear", align_corners=False)
        return map_pix, map_feat
