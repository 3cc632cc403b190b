"""`automl-cxr lungs train`: fit the lung segmenter on V7's outlines, score it on whole Cohen
sites it never saw (Dice), and write the checkpoint with its hash."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from automl_cxr.errors import ConfigError
from automl_cxr.lungs._outlines import LungOutlines, read_outlines
from automl_cxr.lungs._unet import LungUNet, save_segmenter

__all__ = ["SegmenterTraining", "dice_scores", "site_holdout", "train_segmenter"]


@dataclass
class SegmenterTraining:
    """What `train_segmenter` wrote and measured."""

    path: Path
    sha256: str
    info: dict[str, Any]


def site_holdout(outlines: LungOutlines, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of held-out rows: whole Cohen sites (sites that share a patient merged,
    so no patient straddles), drawn by seed until about `fraction` of the images."""
    from sklearn.model_selection import GroupShuffleSplit

    from automl_cxr.data import site_groups

    groups = site_groups(outlines.patients, outlines.sites)
    split = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    _, test = next(split.split(np.zeros(len(groups)), groups=groups))
    out = np.zeros(len(groups), dtype=bool)
    out[test] = True
    return out


def dice_scores(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image Dice of boolean masks (N, H, W); 1.0 where both are empty."""
    p, t = pred.reshape(len(pred), -1), truth.reshape(len(truth), -1)
    inter = (p & t).sum(1)
    denom = p.sum(1) + t.sum(1)
    return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """Random flips, small affine (scale, shift, rotation) and contrast jitter, on both."""
    b = x.shape[0]
    ang = (torch.rand(b, generator=gen) - 0.5) * (2 * np.pi * 10 / 360)
    scale = 1 + (torch.rand(b, generator=gen) - 0.5) * 0.3
    shift = (torch.rand(b, 2, generator=gen) - 0.5) * 0.2
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], 1),
            torch.stack([sin * flip, cos, shift[:, 1]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="border")
    y = F.grid_sample(y, grid, align_corners=False, mode="nearest")
    gamma = torch.exp((torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.8)
    return x.clamp(0, 1).pow(gamma), y


def _predict(net: LungUNet, x: np.ndarray, batch: int = 32) -> np.ndarray:
    out = []
    net.eval()
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.asarray(x[i : i + batch])).float().div(255).unsqueeze(1)
            out.append((net(xb) > 0).squeeze(1).numpy())
    return np.concatenate(out)


def train_segmenter(
    zip_path: str | Path,
    cohen_root: str | Path,
    out: str | Path,
    *,
    size: int = 128,
    epochs: int = 12,
    batch_size: int = 16,
    lr: float = 2e-3,
    holdout: float = 0.2,
    seed: int = 0,
    encoder: str = "mobilenetv2_100",
    pretrained: bool = True,
    exclude: Sequence[str | Path] = (),
    log: Callable[[str], None] | None = None,
) -> SegmenterTraining:
    """Train on the outlined images of the Cohen sites not held out, report Dice on the held-out
    sites (per image: mean, median, 5th percentile), and save the model trained on the
    training sites only (so the reported Dice is that of the file written). `exclude`: image
    sets (folders or CSVs, as for `data prepare --exclude`) whose images, and every other
    outlined image of their patients, are left out (e.g. an external test set)."""
    if not 32 <= size <= 512 or size % 32:
        raise ConfigError(f"size must be a multiple of 32 in [32, 512], but got size={size}")
    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1, but got epochs={epochs}")
    if not 0 < holdout < 0.5:
        raise ConfigError(f"holdout must lie in (0, 0.5), but got holdout={holdout}")
    started = time.perf_counter()
    data = read_outlines(zip_path, cohen_root, size=size)
    if exclude:
        from automl_cxr.data import excluded_images

        held, _ = excluded_images(exclude)
        hit = np.array([sha in held for sha in data.shas])
        patients = set(data.patients[hit].tolist())
        data = data.drop(~np.isin(data.patients, list(patients)), "excluded (and their patients)")
    test = site_holdout(data, holdout, seed)
    tr = np.flatnonzero(~test)
    torch.manual_seed(seed)
    net = LungUNet(encoder)
    weights = "random"
    if pretrained:
        from automl_cxr.models import ModelConfig, build_model

        bb = build_model(ModelConfig(backbone=encoder, num_classes=1, pretrained=True))
        net.load_encoder_weights(bb.backbone.state_dict())
        ws = bb.weight_source
        weights = f"{ws.kind}: {ws.description or ws.path}"
    x_all = torch.from_numpy(data.images).float().div(255).unsqueeze(1)
    y_all = torch.from_numpy(data.masks).float().unsqueeze(1)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * int(np.ceil(len(tr) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        perm = tr[torch.randperm(len(tr), generator=gen).numpy()]
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = torch.from_numpy(perm[i : i + batch_size])
            x, y = _augment(x_all[idx], y_all[idx], gen)
            logits = net(x)
            prob = torch.sigmoid(logits)
            inter = (prob * y).sum((1, 2, 3))
            dice = 1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)
            loss = F.binary_cross_entropy_with_logits(logits, y) + dice.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log:
            log(f"epoch {epoch + 1}/{epochs}: loss {total / len(tr):.4f}")
    d = dice_scores(_predict(net, data.images[test]), data.masks[test])
    held_sites = sorted(set(data.sites[test].tolist()))
    info = {
        "trained_on": {
            "images": int(len(tr)),
            "sites": int(len(set(data.sites[~test].tolist()))),
            "names_sha256": _names_hash([data.names[i] for i in tr]),
        },
        "heldout": {
            "images": int(test.sum()),
            "sites": held_sites,
            "dice_mean": round(float(d.mean()), 4),
            "dice_median": round(float(np.median(d)), 4),
            "dice_p05": round(float(np.percentile(d, 5)), 4),
            "dice_min": round(float(d.min()), 4),
        },
        "size": size,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "holdout": holdout,
        "encoder": encoder,
        "encoder_weights": str(weights),
        "outlines": str(Path(zip_path).name),
        "skipped": data.skipped,
        "exclude": [str(p) for p in exclude],
        "seconds": round(time.perf_counter() - started, 1),
        "torch": str(torch.__version__),
    }
    out = Path(out)
    sha = save_segmenter(net, out, size=size, info=info)
    return SegmenterTraining(out, sha, info)


def _names_hash(names: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]
