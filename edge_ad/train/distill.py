"""``edge-ad distill-teacher``: a PDN teacher distilled from ImageNet EfficientNet-Lite0 features.

The paper distills WideResNet-101-2 (layer2 + layer3 at 512x512, 384 channels) on ImageNet for 60,000
steps. Here: the offline EfficientNet-Lite0 (stride-8 + stride-16 features, 152 channels, resampled to
the padded PDN's 64x64 grid at 256x256 and normalized per channel) on the image folder the user gives,
MSE loss, Adam 1e-4 / weight decay 1e-5 (the paper's). The file is a plain PDN state_dict, the public
``teacher_small.pth`` format, loaded by ``edge-ad train --teacher FILE``.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import atomic
from ..data.image import list_images
from ..errors import InputError
from ..models.efficientad import IMAGENET_MEAN, IMAGENET_STD, Lite0Teacher
from ..models.pdn import pdn
from .common import color_jitter, load_images, sample_batch, seed_everything


def distill(data, out, size: str = "s", image_size: int = 256, steps: int = 2000, batch_size: int = 8,
            seed: int = 0, device: str = "cpu", lr: float = 1e-4) -> dict:
    from tqdm import tqdm

    paths = list_images(data)
    if len(paths) < 2:
        raise InputError(f"{data}: need at least 2 images to distill a teacher, found {len(paths)}")
    seed_everything(seed)
    imgs = load_images(paths, image_size, "loading images")
    target = Lite0Teacher(image_size).to(device).eval()
    grid = image_size // 4
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    @torch.no_grad()
    def feats(x):
        f = target.net(x)
        return torch.cat([F.interpolate(t, size=(grid, grid), mode="bilinear", align_corners=False) for t in f], 1)

    with torch.no_grad():
        sample = torch.cat([feats(imgs[i:i + 8].float().to(device)) for i in range(0, min(len(imgs), 64), 8)])
        f_mean = sample.mean(dim=(0, 2, 3), keepdim=True)
        f_std = sample.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    channels = int(sample.shape[1])
    net = pdn(size, channels, padding=True).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-5)
    gen = torch.Generator().manual_seed(seed)
    loss_v = float("nan")
    tty = sys.stderr.isatty()  # logs (CI, journald) get a progress line every 30 s, as training does
    for _ in tqdm(range(steps), desc="distill teacher", unit="step", mininterval=0.1 if tty else 30.0):
        x = color_jitter(sample_batch(imgs, batch_size, gen), 0.1, gen).to(device)
        y = (feats(x) - f_mean) / f_std
        pred = net((x - mean) / std)
        loss = F.mse_loss(pred, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = float(loss.detach())
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in net.state_dict().items()}, buf)
    atomic.write_bytes(Path(out), buf.getvalue())
    return {"channels": channels, "final_loss": loss_v}
