"""``edge-ad distill-teacher``: a PDN teacher distilled from ImageNet EfficientNet-Lite0 features.

The paper distills WideResNet-101-2 (layer2 + layer3 at 512x512, 384 channels) on ImageNet for 60,000
steps of batch 16. Here: the offline EfficientNet-Lite0 (stride-8 + stride-16 features, 152 channels,
resampled to the padded PDN's 64x64 grid at 256x256 and normalized per channel) on the image folders the
user gives (ImageNet if at hand; ``edge-ad generic-images`` paints dead-leaves pictures where it is not),
MSE loss, Adam 1e-4 / weight decay 1e-5 (the paper's), with the training loop's progress bar, time
budget (``max_minutes``), checkpoints every ``checkpoint_every`` steps to ``OUT.state.pt`` and ``resume``
(refused unless the PDN size, image size, folders, their images, seed and batch size match the checkpoint's;
the target normalization is taken back from it), and its x0.1 learning-rate drop for the last 5 % of the
steps. The file is a plain PDN state_dict, the public ``teacher_small.pth`` format, loaded by
``edge-ad train --teacher FILE``.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import atomic
from ..data.image import IMAGE_EXTS, list_images
from ..errors import InputError
from ..models.efficientad import IMAGENET_MEAN, IMAGENET_STD, Lite0Teacher
from ..models.pdn import pdn
from .common import (check_run, color_jitter, fast_convolutions, file_list_id, image_folder, load_images, resume_state,
                     sample_batch, seed_everything)
from .loops import LoopConfig, run_loop

log = logging.getLogger(__name__)


def distill(data: str | os.PathLike | Sequence[str | os.PathLike], out, size: str = "s", image_size: int = 256,
            steps: int = 2000, batch_size: int = 8, seed: int = 0, device: str = "cpu", lr: float = 1e-4,
            max_minutes: float | None = None, resume: bool = False, checkpoint_every: int = 1000) -> dict:
    """Distill a PDN teacher into the file ``out`` (its checkpoints: ``OUT.state.pt``). One run at a time per
    ``out``: a second is refused at once (:class:`InputError`, exit 2) naming the file and the first's pid, since
    both would write the same checkpoint and teacher file."""
    out = atomic.check_creatable(out)
    with atomic.output_lock(out, f"--out {out}: another edge-ad distill-teacher writing this file is running "
                            "(pid {pid}); try again when it has finished, or choose another --out (nothing "
                            "was changed)"):
        return _distill(data, out, size=size, image_size=image_size, steps=steps, batch_size=batch_size, seed=seed,
                        device=device, lr=lr, max_minutes=max_minutes, resume=resume,
                        checkpoint_every=checkpoint_every)


def _distill(data: str | os.PathLike | Sequence[str | os.PathLike], out, size: str = "s", image_size: int = 256,
             steps: int = 2000, batch_size: int = 8, seed: int = 0, device: str = "cpu", lr: float = 1e-4,
             max_minutes: float | None = None, resume: bool = False, checkpoint_every: int = 1000) -> dict:
    check_run(device, max_minutes, steps, batch_size, checkpoint_every, seed, image_size, lr)
    out = atomic.check_creatable(out)
    folders = [image_folder(f) for f in ([data] if isinstance(data, (str, os.PathLike)) else data)]
    listed = [list_images(f) for f in folders]
    paths = [p for ps in listed for p in ps]
    if len(paths) < 2:
        raise InputError(f"{', '.join(map(str, folders))}: need at least 2 images ({', '.join(IMAGE_EXTS)}) to "
                         f"distill a teacher, found {len(paths)} (an MVTec category's are taken from its train/good)")
    # what defines the run: saved in each checkpoint, checked by --resume before any image is loaded
    run = {"command": "edge-ad distill-teacher", "--size": size, "--image-size": int(image_size),
           "--data": [str(Path(f).resolve()) for f in folders],
           "images": file_list_id([f"{i}/{p.name}" for i, ps in enumerate(listed) for p in ps]),
           "--seed": int(seed), "--batch-size": int(batch_size), "learning rate": float(lr)}
    state_path = out.with_name(out.name + ".state.pt")
    resume_from = resume_state(state_path, run) if resume else None
    seed_everything(seed)
    imgs = load_images(paths, image_size, "loading images").to(device)  # once: a GPU step reads no host memory
    target = Lite0Teacher(image_size).to(device).eval()
    grid = image_size // 4
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    fast_convolutions(device)

    @torch.no_grad()
    def feats(x):
        f = target.net(x)
        return torch.cat([F.interpolate(t, size=(grid, grid), mode="bilinear", align_corners=False) for t in f], 1)

    if resume_from is not None:
        # the first part's target normalization, so the targets do not move (e.g. on another device)
        f_mean, f_std = (resume_from["extra"][k].to(device) for k in ("f_mean", "f_std"))
    else:
        with torch.no_grad():  # channel normalization of the targets, from a spread sample of the images
            pick = torch.linspace(0, len(imgs) - 1, min(len(imgs), 256)).long()
            sample = torch.cat([feats(imgs[pick[i:i + 16]].float()) for i in range(0, len(pick), 16)])
            f_mean = sample.mean(dim=(0, 2, 3), keepdim=True)
            f_std = sample.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    channels = int(f_mean.shape[1])
    net = pdn(size, channels, padding=True).to(device)

    def step(gen):
        x = color_jitter(sample_batch(imgs, batch_size, gen), 0.1, gen)
        loss = F.mse_loss(net((x - mean) / std), (feats(x) - f_mean) / f_std)
        return {"loss": loss}

    cfg = LoopConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device, resume=resume,
                     state_path=state_path, checkpoint_every=checkpoint_every,
                     max_seconds=None if max_minutes is None else 60.0 * max_minutes, run=run,
                     resume_from=resume_from, extra={"f_mean": f_mean.cpu(), "f_std": f_std.cpu()}, lr_flag="--lr")
    net.train()
    res = run_loop(step, net, list(net.parameters()), cfg, "distill teacher")
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in net.state_dict().items()}, buf)
    atomic.write_bytes(out, buf.getvalue())
    return {"channels": channels, "final_loss": res["final_losses"].get("loss", float("nan")),
            "images": len(paths), **{k: v for k, v in res.items() if k != "final_losses"}}
