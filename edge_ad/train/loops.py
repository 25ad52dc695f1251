"""Gradient training loops: EfficientAD (student + autoencoder) and the FADeR-style inpainter.

Both loops: Adam, learning rate x0.1 at 95% of the steps (EfficientAD's schedule), a tqdm progress bar,
a checkpoint every ``checkpoint_every`` steps (``train_state.pt``, atomic) and ``resume``. A checkpoint
records what defines its run (``LoopConfig.run``); a resume is refused unless the run matches it.
SIGINT / SIGTERM (Ctrl-C) during a loop with a checkpoint file finish the current step, save the state
there and raise :class:`Interrupted`; a second one aborts at once.
A loss that is not finite (read every 10 steps, before each save and at the end), or weights that are not
(read before each save, at the end and when a step fails: FADeR's loss refuses NaN outputs with a RuntimeError),
stops the loop with an InputError naming the step: no state of the NaN weights is saved. A --resume from the
checkpoint before it would repeat the same steps at the same learning rate (and is refused at another), so the
error says to train again from step 0 with a lower ``LoopConfig.lr_flag``. Deterministic given the seed (CPU).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InputError
from .common import (color_jitter, fast_convolutions, load_checkpoint, planted_anomalies, progress_bar, resume_state,
                     sample_batch, save_checkpoint)

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    steps: int
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    state_path: Path | None = None
    max_seconds: float | None = None  # a time budget: stop there (the schedule then follows the clock)
    run: dict | None = None  # what defines the run ({option: value}), saved in each checkpoint, checked at resume
    resume_from: dict | None = None  # the checkpoint already read and checked by common.resume_state
    extra: dict | None = None  # tensors saved in each checkpoint that the run needs back at resume
    started: float | None = None  # time.time() when the command started (default: the loop's start); each
                                  # checkpoint's "seconds" count from there, plus the resumed runs' seconds
    fit_teacher_norm: bool = True  # EfficientAD: fit the teacher normalization on the images (not at a resume,
                                   # whose checkpoint has it; not for --adapt, which keeps the bundle's)
    lr_flag: str | None = None  # the command's option that sets the learning rate: a non-finite loss's error
                                # says to train again from step 0 with a lower one (None: the command has none)


def lr_at(step: int, cfg: LoopConfig, elapsed: float = 0.0) -> float:
    """EfficientAD's schedule: the learning rate drops to 10% at 95% of the steps (a pure function of the
    step, so a resumed run with the same total steps follows the same schedule). With a time budget the
    drop also comes at 95% of the budget, so a run the clock stops still ends with its low-rate phase."""
    late = step >= int(0.95 * cfg.steps) or (cfg.max_seconds is not None and elapsed >= 0.95 * cfg.max_seconds)
    return cfg.lr * (0.1 if late else 1.0)


class Interrupted(KeyboardInterrupt):
    """A loop stopped by SIGINT / SIGTERM between two steps, its state saved; the message says where,
    ``signum`` which signal stopped it."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


@contextmanager
def stop_requests():
    """While in the block, SIGINT and SIGTERM set ``flag["signal"]`` instead of stopping the process; a second
    one restores the previous handlers and is re-raised to them (Ctrl-C twice aborts at once). The previous
    handlers are restored on leaving. Outside the main thread (no handler can be installed there) and for a
    signal that is ignored, nothing changes: the flag is never set."""
    flag: dict = {"signal": None}
    previous: dict = {}

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        previous.clear()

    def handler(signum, frame):
        if flag["signal"] is not None:
            restore()
            signal.raise_signal(signum)
            return
        flag["signal"] = signum
        log.warning("%s: stopping after this step (again to abort at once)", signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.getsignal(sig)
            if old not in (signal.SIG_IGN, None):
                previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        restore()


def run_loop(step_fn, model, params, cfg: LoopConfig, desc: str) -> dict:
    """Run ``step_fn`` from step 0 (or the checkpoint's step at a resume) to ``cfg.steps``. With a checkpoint
    file, SIGINT / SIGTERM stop it between two steps: the state is saved there and :class:`Interrupted` raised."""
    if cfg.state_path is None:
        return _run_loop(step_fn, model, params, cfg, desc, {"signal": None})
    with stop_requests() as flag:
        return _run_loop(step_fn, model, params, cfg, desc, flag)


def _run_loop(step_fn, model, params, cfg: LoopConfig, desc: str, stop: dict) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=True if str(cfg.device).startswith("cuda") else None)
    start = 0
    earlier = 0.0  # the seconds of the runs this one continues
    if cfg.resume:
        if cfg.state_path is None:
            raise InputError("--resume: this run has no checkpoint file to resume from")
        st = cfg.resume_from if cfg.resume_from is not None else resume_state(cfg.state_path, cfg.run or {})
        start = load_checkpoint(cfg.state_path, st, model, opt, gen)
        earlier = float(st.get("seconds", 0.0))
        log.warning("resumed from %s at step %d", cfg.state_path, start)
    t0 = time.time()
    started = t0 if cfg.started is None else cfg.started

    losses: dict = {}
    names: list = []
    first_bad = None  # per loss, on the device (no host sync per step): the first step it was not finite
    bar = progress_bar(cfg.steps, desc, "step", initial=start)

    def check_finite():
        """Stop at a non-finite loss (read every 10 steps and before any save): its weights are lost."""
        if first_bad is None:
            return
        at = first_bad.tolist()
        bad = [(s, n) for s, n in zip(at, names) if s < cfg.steps]
        if not bad:
            return
        step = min(s for s, _ in bad)
        diverged(f"the loss is not finite (NaN or inf) at step {step + 1} of {cfg.steps} "
                 f"({', '.join(n for s, n in bad if s == step)})")

    def diverged(what):
        bar.close()
        kept = (f"{cfg.state_path} keeps the last checkpoint saved before it" if cfg.state_path is not None
                and cfg.state_path.is_file() else "no training state was saved")
        lower = "" if cfg.lr_flag is None else (
            f"; for the learning rate, train again from step 0 (without --resume) with a lower {cfg.lr_flag}, e.g. "
            f"{cfg.lr_flag} {cfg.lr / 10:g}: --resume refuses another learning rate, and with this one it takes "
            "the same steps again and likely stops the same way")
        raise InputError(
            f"{desc}: {what}: training stopped there, its weights are lost "
            f"and nothing was written from them ({kept}). Likely causes: a learning rate too high "
            f"(learning rate {cfg.lr:g}), images with broken or extreme pixel values, or a teacher whose weights "
            f"or outputs are not finite{lower}")

    def check_weights(where):
        """Stop at non-finite weights: an update made them so while its loss was finite (a NaN step size or
        gradient). Read before any save, when a step fails and at the end, not every step."""
        with torch.no_grad():
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                diverged(f"the weights are not finite (NaN or inf) {where}, though the losses were (an update "
                         "with a gradient or step size that was not)")

    def save(step):
        check_finite()  # never a state that --resume would continue on NaN weights from
        check_weights(f"at the checkpoint of step {step} of {cfg.steps}")
        save_checkpoint(cfg.state_path, model, opt, step, gen, cfg.run, cfg.extra,
                        seconds=earlier + time.time() - started)

    done = start
    for step in range(start, cfg.steps):
        if stop["signal"] is not None:
            break
        elapsed = time.time() - t0
        if cfg.max_seconds is not None and elapsed >= cfg.max_seconds:
            log.warning("time budget of %.1f min reached at step %d of %d: stopping there",
                        cfg.max_seconds / 60, step, cfg.steps)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, elapsed)
        opt.zero_grad(set_to_none=True)
        try:
            losses = step_fn(gen)
        except RuntimeError:
            # a loss that checks its input (FADeR's binary cross-entropy: "all elements of input should be between
            # 0 and 1") refuses the outputs of weights a non-finite loss of an earlier step left: that loss is the
            # cause, said as such, not a traceback
            check_finite()
            check_weights(f"at step {step + 1} of {cfg.steps}, where the step failed")
            raise
        losses["loss"].backward()
        opt.step()
        done = step + 1
        names = [k for k, v in losses.items() if torch.is_tensor(v)]
        bad = ~torch.isfinite(torch.stack([losses[k].detach().float().reshape(()) for k in names]))
        first_bad = (torch.where(bad, step, cfg.steps) if first_bad is None else
                     torch.where(bad & (first_bad == cfg.steps), step, first_bad))
        bar.update(1)
        if step % 10 == 0:  # reading a loss waits for the GPU: not on every step
            check_finite()
            bar.set_postfix(loss=f"{float(losses['loss'].detach()):.4f}", refresh=False)  # shown at the next line
        if cfg.state_path is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save(step + 1)
    bar.close()
    check_finite()
    check_weights(f"after step {done} of {cfg.steps}")
    last = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}
    if stop["signal"] is not None:
        save(done)
        raise Interrupted(f"interrupted at step {done} of {cfg.steps}; the training state is in {cfg.state_path}: "
                          "rerun the same command with --resume to continue", signum=stop["signal"])
    if cfg.state_path is not None and done > start:
        save(done)
    out = {"final_losses": last, "train_seconds": time.time() - t0, "steps": done, "resumed_at": start,
           "earlier_seconds": earlier}
    if done < cfg.steps:
        out.update(planned_steps=cfg.steps, stopped_by_time_budget=True)
    return out


@torch.no_grad()
def fit_teacher_normalization(model, images: torch.Tensor, device: str, batch: int = 8) -> None:
    """Per-channel mean / std of the teacher output over the training images (EfficientAD, Alg. 1), with a
    progress bar (:func:`~edge_ad.train.common.progress_bar`: also lines in a log)."""
    model.t_mean.zero_()
    model.t_std.fill_(1.0)
    s1 = s2 = None
    n = 0
    with progress_bar(int(images.shape[0]), "teacher normalization", "img") as bar:
        for i in range(0, images.shape[0], batch):
            t = model.teacher_features(images[i:i + batch].float().to(device))
            s1 = t.sum(dim=(0, 2, 3)) if s1 is None else s1 + t.sum(dim=(0, 2, 3))
            s2 = (t ** 2).sum(dim=(0, 2, 3)) if s2 is None else s2 + (t ** 2).sum(dim=(0, 2, 3))
            n += t.shape[0] * t.shape[2] * t.shape[3]
            bar.update(t.shape[0])
    mean = s1 / n
    std = (s2 / n - mean ** 2).clamp_min(1e-12).sqrt()
    model.t_mean.copy_(mean.view(1, -1, 1, 1))
    model.t_std.copy_(std.view(1, -1, 1, 1))


def quantile_rank(n: int, q: float) -> int:
    """1-based rank whose value is the first one at or above ``torch.quantile(x, q)`` of ``n`` values
    (linear interpolation sits at 0-based position q*(n-1)). ``kthvalue`` at this rank gives the hard-feature
    threshold without ``torch.quantile``'s input-size limit; elements ``>=`` it are the ones the paper's
    ``D >= quantile(D, q)`` keeps."""
    pos = q * (n - 1)
    r = math.floor(pos)
    if pos - r > 1e-12 * max(n, 1):  # strictly between two order statistics: the upper one is the first kept
        r += 1
    return min(r + 1, n)


def train_efficientad(model, images: torch.Tensor, cfg: LoopConfig, penalty: torch.Tensor | None = None,
                      q_hard: float = 0.999) -> dict:
    """EfficientAD losses: L_hard (q=0.999) + penalty + L_AE + L_STAE (Batzner et al., Sec. 3)."""
    dev = cfg.device
    model.to(dev)
    images = images.to(dev)  # once: a GPU step then reads no host memory
    penalty = None if penalty is None else penalty.to(dev)
    fast_convolutions(dev)
    if cfg.fit_teacher_norm and not cfg.resume:  # a resumed run gets the first part's statistics back
        fit_teacher_normalization(model, images, dev)
    model.teacher.eval()
    model.student.train()
    model.autoencoder.train()
    c = model.channels
    def step(gen):
        # random draws on the CPU generator (checkpointed, same on every device), pixels on the device
        img = sample_batch(images, cfg.batch_size, gen)
        aug = color_jitter(img, 0.2, gen, one_of=True)  # one of the three, as published
        b = img.shape[0]
        with torch.no_grad():  # one teacher pass over both the image and its jittered copy
            t, t_aug = model.teacher_features(torch.cat([img, aug])).split(b)
        xa = model.normalize(aug)
        s_all = model.student(torch.cat([model.normalize(img), xa]))  # one student pass, both inputs
        s, s_ae = s_all[:b, :c], s_all[b:, c:]
        d = (t - s) ** 2
        flat = d.flatten()
        d_hard = flat.kthvalue(quantile_rank(flat.numel(), q_hard)).values
        hard = (d >= d_hard).to(d.dtype)  # the mean over the hardest elements, without a host sync
        l_hard = (d * hard).sum() / hard.sum()
        loss_st = l_hard
        out = {}
        if penalty is not None:
            p = sample_batch(penalty, cfg.batch_size, gen)
            l_p = (model.student(model.normalize(p))[:, :c] ** 2).mean()
            loss_st = loss_st + l_p
            out["penalty"] = l_p.detach()
        a = model.autoencoder(xa)
        l_ae = ((t_aug - a) ** 2).mean()
        l_stae = (a - s_ae).pow(2).mean()
        out.update(loss=loss_st + l_ae + l_stae, hard=l_hard.detach(), ae=l_ae.detach(), stae=l_stae.detach())
        return out

    params = list(model.student.parameters()) + list(model.autoencoder.parameters())
    res = run_loop(step, model, params, cfg, "train efficientad")
    model.eval()
    return res


def train_fader(model, images: torch.Tensor, cfg: LoopConfig, tau: float = 0.1, w_att: float = 0.1) -> dict:
    """Reconstruct clean images from inputs with planted anomalies; attenuation targets from patch errors."""
    dev = cfg.device
    model.to(dev)
    model.backbone.eval()
    def step(gen):
        clean = sample_batch(images, cfg.batch_size, gen)
        bad, _mask = planted_anomalies(clean, gen, images)
        clean, bad = clean.to(dev), bad.to(dev)
        xc = (clean - model.mean) / model.std
        xb = (bad - model.mean) / model.std
        m = model.mask(bad)
        rec, atts = model.reconstruct(xb, m)
        l_rec = (rec - xc).abs().mean()
        err = (xb - xc).abs().mean(dim=1, keepdim=True)
        l_att = 0.0
        for a in atts:
            e = F.adaptive_avg_pool2d(err, a.shape[-2:])
            target = torch.exp(-e / tau)
            l_att = l_att + F.binary_cross_entropy(a, target)
        loss = l_rec + w_att * l_att
        return {"loss": loss, "rec": l_rec.detach(), "att": torch.as_tensor(l_att).detach()}

    params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    model.train()
    model.backbone.eval()
    res = run_loop(step, model, params, cfg, "train fader")
    model.eval()
    return res
