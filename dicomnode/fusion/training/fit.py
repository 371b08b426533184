"""`train fit`: supervised training of :class:`FusionNet` on the training database.

Loss = L1 + 0.5 * (1 - SSIM) + 0.5 * gradient-L1 against the database target:
L1 keeps intensities (and so MI/SCD) faithful without the blur an L2 fit gives; the SSIM term
rewards local structure and contrast (the benchmark's SSIM and VIF); the gradient term keeps edges
as strong and as placed as in the target (SF, AG, Qabf). Augmentation: random crops, flips and
90-degree rotations (the same on both sources and the target). Seeded and deterministic; the
checkpoint with the lowest loss on the ``val`` pairs is kept.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from dicomnode.fusion.model import DEFAULT_MODEL_NAME, WEIGHTS_FILE, build_net, load_checkpoint
from dicomnode.fusion.resample import resolve_device

log = logging.getLogger(__name__)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def load_db(db_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    """(a, b, target) stacks (N,1,H,W) in [0,1] and the manifest entries of one split."""
    db_dir = Path(db_dir)
    manifest_path = db_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no training database at {db_dir} (run 'dicomnode train build-db' first)")
    manifest = json.loads(manifest_path.read_text())
    entries = [e for e in manifest["pairs"] if e["split"] == split]
    if not entries:
        raise ValueError(f"the training database at {db_dir} has no {split!r} pairs")
    a, b, t = [], [], []
    for e in entries:
        base = db_dir / "pairs" / e["pair_type"]
        a.append(_read(base / f"{e['name']}_a.png"))
        b.append(_read(base / f"{e['name']}_b.png"))
        t.append(_read(db_dir / "targets" / e["pair_type"] / f"{e['name']}.png"))
    as_t = lambda xs: torch.from_numpy(np.stack(xs))[:, None]  # noqa: E731
    return as_t(a), as_t(b), as_t(t), entries


def _ssim_map(x: torch.Tensor, y: torch.Tensor, win: int = 7) -> torch.Tensor:
    pad = win // 2
    mu = lambda z: F.avg_pool2d(F.pad(z, (pad,) * 4, mode="replicate"), win, stride=1)  # noqa: E731
    ux, uy = mu(x), mu(y)
    vx = mu(x * x) - ux * ux
    vy = mu(y * y) - uy * uy
    vxy = mu(x * y) - ux * uy
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def _grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def fusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + 0.5 (1 - SSIM) + 0.5 gradient L1 (see the module docstring for why)."""
    l1 = (pred - target).abs().mean()
    ss = 1.0 - _ssim_map(pred, target).mean()
    pgx, pgy = _grad(pred)
    tgx, tgy = _grad(target)
    gl = (pgx - tgx).abs().mean() + (pgy - tgy).abs().mean()
    return l1 + 0.5 * ss + 0.5 * gl


def _augment(
    a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, crop: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same random crop / flip / rot90 for each sample's three images."""
    x = torch.cat([a, b, t], dim=1)
    n, _, h, w = x.shape
    out = []
    for i in range(n):
        top = int(torch.randint(0, h - crop + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - crop + 1, (1,), generator=gen))
        s = x[i, :, top : top + crop, left : left + crop]
        if torch.rand(1, generator=gen) < 0.5:
            s = s.flip(-1)
        if torch.rand(1, generator=gen) < 0.5:
            s = s.flip(-2)
        s = torch.rot90(s, int(torch.randint(0, 4, (1,), generator=gen)), dims=(-2, -1))
        out.append(s)
    y = torch.stack(out)
    return y[:, 0:1], y[:, 1:2], y[:, 2:3]


def fit(
    db_dir: Path,
    out_path: Path = WEIGHTS_FILE,
    steps: int = 2000,
    batch_size: int = 12,
    crop: int = 112,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "auto",
    val_every: int = 100,
    width: int = 24,
    progress: bool = True,
    command: str = "",
    init: Path | None = None,
) -> dict[str, Any]:
    """Train, keep the best checkpoint on ``val``, write it to ``out_path``; returns its metadata."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_flush_denormal(True)  # tiny gradients must not fall onto the slow denormal path
    torch.use_deterministic_algorithms(True, warn_only=True)
    dev = resolve_device(device)
    a_tr, b_tr, t_tr, e_tr = load_db(db_dir, "train")
    a_va, b_va, t_va, e_va = load_db(db_dir, "val")
    crop = min(crop, a_tr.shape[-1], a_tr.shape[-2])
    config = {"width": width, "dilations": [1, 2, 4, 8]}
    net = build_net(config)
    if init is not None:  # fine-tune (e.g. a per-modality specialisation of the general model)
        ck = load_checkpoint(Path(init))
        config = dict(ck.get("config") or config)
        net = build_net(config)
        net.load_state_dict(ck["state_dict"])
    net = net.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)

    def val_loss() -> float:
        net.eval()
        total = 0.0
        with torch.inference_mode():
            for i in range(0, a_va.shape[0], 16):
                sl = slice(i, i + 16)
                pred = net(a_va[sl].to(dev), b_va[sl].to(dev))
                total += float(fusion_loss(pred, t_va[sl].to(dev))) * pred.shape[0]
        net.train()
        return total / a_va.shape[0]

    best = (val_loss(), 0, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
    t0 = time.time()
    bar = tqdm(range(1, steps + 1), desc="train fit", disable=not progress, unit="step")
    net.train()
    for step in bar:
        idx = torch.randint(0, a_tr.shape[0], (batch_size,), generator=gen)
        a, b, t = _augment(a_tr[idx], b_tr[idx], t_tr[idx], crop, gen)
        pred = net(a.to(dev), b.to(dev))
        loss = fusion_loss(pred, t.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % val_every == 0 or step == steps:
            vl = val_loss()
            if vl < best[0]:
                best = (vl, step, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
            bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{vl:.4f}", best=f"{best[0]:.4f}@{best[1]}")
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", best=f"{best[0]:.4f}@{best[1]}")
    manifest = json.loads((Path(db_dir) / "manifest.json").read_text())
    meta = {
        "name": DEFAULT_MODEL_NAME,
        "version": f"1-s{seed}-{best[1]}",
        "val_loss": best[0],
        "best_step": best[1],
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "crop": crop,
        "lr": lr,
        "train_seconds": round(time.time() - t0, 1),
        "device": str(dev),
        "n_train": len(e_tr),
        "n_val": len(e_va),
        "db_rule": manifest.get("rule", ""),
        "db_candidates": manifest.get("candidates", []),
        "command": command,
        "init": str(init) if init is not None else "",
        # content hashes of every image the model saw: the leak test checks them against the benchmark
        "train_hashes": sorted(
            {e[k] for e in e_tr + e_va for k in ("hash_a", "hash_b", "hash_pair_a", "hash_pair_b")}
        ),
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": best[2], "config": config, "meta": meta}, out_path)
    log.info("saved %s (val loss %.4f at step %d)", out_path, best[0], best[1])
    return meta
