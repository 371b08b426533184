"""`train refine`: metric-aware fine-tuning of the supervised model for one pair type (CT, PET, ...).

Stage 1 (`train fit`) teaches the network the "successful fusion results" of the database.
Stage 2, here, keeps that supervision and adds what the targets cannot teach: the fusion metrics
measured against the *sources*. Loss per batch of ``train`` pairs of one type:

    fusion_loss(net(a, b), supervised(a, b)) - lam * metric_reward(net(a, b), a, b, refs, weights)

- ``supervised`` is the stage-1 model (frozen): its output is the learned database target, so
  the supervision covers every ``train`` row, not only the rows the database scored;
- ``metric_reward`` (:mod:`.metric_loss`) is the weighted relative gain over the best of the
  reference fusions (:data:`REWARD_REFERENCES`: pixel max and a Laplacian pyramid; the stage-1
  model itself can be added as a floor for the metrics it leads on), per differentiable metric
  (SD, SF, AG, SCD, VIF, Qabf, SSIM): linear below them, saturating at ``cap`` above them, so no
  metric can be bought without limit.

The checkpoint is picked on the type's ``val`` rows: the most metrics (of nine, MI/EN included,
8-bit as stored) on which it beats every classical fuser (max, average, Laplacian pyramid, guided
filter), then the largest summed relative margin (``pick="last"`` keeps the last step instead).
For PET/SPECT the count is summed over intensity conditions (:data:`INTENSITY_CONDITIONS`: the
MRI or the moving image dimmed to 70 % or through gamma 1.5), so a model that wins only at the
atlas's own intensities is not picked.
``holdout_case`` validates across patients instead: it trains on the ``train`` and ``val`` rows of
the other atlas cases and scores every row of the held-out case. The ``val`` rows are slices of
the same few cases as the ``train`` rows (MRI-PET: three cases), so a model picked on them can
fit those patients; a held-out case says how a setting carries over to a new patient, which is
what the node meets (the benchmark's PET slices come from another case). Leak guard: rows with
a benchmark image are dropped (same pixel-hash rule as the database). Nothing here reads a
benchmark row.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dicomnode.fusion.classical import LaplacianPyramidFuser, graft_stronger_edges, select_edges_in_overlap
from dicomnode.fusion.metrics import METRIC_NAMES, evaluate
from dicomnode.fusion.model import MODALITY_OF_TYPE, WEIGHTS_FILE, build_net, load_checkpoint
from dicomnode.fusion.registry import get_fuser
from dicomnode.fusion.resample import resolve_device
from dicomnode.fusion.training.build_db import benchmark_hashes
from dicomnode.fusion.training.data import load_pairs, pixel_hash, read_manifest
from dicomnode.fusion.training.fit import fusion_loss
from dicomnode.fusion.training.metric_loss import METRICS as REWARDABLE
from dicomnode.fusion.training.metric_loss import metric_reward
from dicomnode.fusion.training.specialise import to_u8

log = logging.getLogger(__name__)

# reward weights per pair type (SSIM weighs most: it is the fidelity every other gain erodes).
# MRI-CT (the shipped CT entry): Qabf and SSIM heavier, SF lighter than the first CT refinement's
# (Qabf 3, SF 2, SSIM 10), so that the val margins over pixel max on SSIM and Qabf are ~1.5 % instead
# of ~0.6 % (docs/research/ct-refinement.md)
REWARD_WEIGHTS: dict[str, dict[str, float]] = {
    "MRI-CT": {"Qabf": 8, "VIF": 1, "SD": 3, "SF": 1, "AG": 2, "SCD": 1, "SSIM": 15},
    "MRI-PET": {"Qabf": 2, "VIF": 2, "SD": 1, "SF": 1, "AG": 1, "SCD": 1, "SSIM": 4},
    "MRI-SPECT": {"Qabf": 2, "VIF": 2, "SD": 1, "SF": 1, "AG": 1, "SCD": 1, "SSIM": 4},
}
# per pair type: reward weight against supervision, saturation of the reward, learning rate
HYPERPARAMETERS: dict[str, dict[str, float]] = {
    "MRI-CT": {"lam": 3.0, "cap": 0.03, "lr": 5e-4},
    "MRI-PET": {"lam": 1.0, "cap": 0.05, "lr": 1e-3},
    "MRI-SPECT": {"lam": 1.0, "cap": 0.05, "lr": 1e-3},
}
# per pair type: the fusions whose metric values the reward measures gains against ("stage1" =
# the frozen stage-1 model as a floor for the metrics it already leads on; for PET that made a
# model that lost its SD with the MRI at 70 % of its level: docs/research/pet-refinement.md)
REWARD_REFERENCES: dict[str, tuple[str, ...]] = {
    "MRI-CT": ("max", "laplacian-pyramid"),
    "MRI-PET": ("max", "laplacian-pyramid"),
    "MRI-SPECT": ("max", "laplacian-pyramid"),
}
# per pair type: metrics whose reward also counts the stage-1 model as a reference (a floor: the
# refinement may not sell them off), without making it a reference for the others
STAGE1_FLOOR: dict[str, tuple[str, ...]] = {"MRI-CT": (), "MRI-PET": (), "MRI-SPECT": ()}
# per pair type: the refined model's coefficient grid (1 = 1/4 resolution, 2 = 1/8 as stage 1) and
# whether it keeps full-scale source pixels at full scale (bone clipped by the CT window stays white
# instead of taking MRI texture; with this convention SSIM scores a flat window exactly copied as 1)
DOWN_STRIDE: dict[str, int] = {"MRI-CT": 1, "MRI-PET": 2, "MRI-SPECT": 2}
KEEP_SATURATED: dict[str, bool] = {"MRI-CT": True, "MRI-PET": False, "MRI-SPECT": False}
# per pair type: whether the refined model shows a pixel where only one source has signal (the
# other is 0) as that source, unchanged (the model config flag ``keep_lone_source``)
KEEP_LONE_SOURCE: dict[str, bool] = {"MRI-CT": False, "MRI-PET": False, "MRI-SPECT": False}
VAL_REFERENCES = ("max", "average", "laplacian-pyramid", "guided-filter")
# intensity conditions, (gain, gamma) of the MRI and of the moving image: x -> gain * x ** gamma.
# A DICOM series reaches the node under another window, gain or display curve than the atlas
# PNGs; a refinement that wins only at the atlas's own intensities is fragile (seen: a PET
# refinement first on 7/9 on val fell below pixel max's SD once the MRI was at 70 % of its level).
INTENSITY_CONDITIONS: dict[str, tuple[float, float, float, float]] = {
    "stored": (1.0, 1.0, 1.0, 1.0),
    "mri-x0.7": (0.7, 1.0, 1.0, 1.0),
    "moving-x0.7": (1.0, 1.0, 0.7, 1.0),
    "mri-gamma1.5": (1.0, 1.5, 1.0, 1.0),
    "moving-gamma1.5": (1.0, 1.0, 1.0, 1.5),
}
# per pair type: the conditions the checkpoint is picked over (MRI-CT: as stored, which is how
# the shipped CT weights were picked and reproduce), and the training-time intensity augmentation
# (0: none; x: per-image gain in [1-x, 1] and gamma in [1/(1+x), 1+x] per source). Augmentation
# was tried and is off: PET with 0.4 (lr 1e-3) drifted and never beat stage 1 over the five
# conditions (28/45 at step 0), with 0.3 (lr 3e-4) it reached 29/45; MRI-CT with 0.4: 17/45
# against 19/45 for the shipped CT weights.
VAL_CONDITIONS: dict[str, tuple[str, ...]] = {
    "MRI-CT": ("stored",),
    "MRI-PET": tuple(INTENSITY_CONDITIONS),
    "MRI-SPECT": tuple(INTENSITY_CONDITIONS),
}
INTENSITY_AUGMENT: dict[str, float] = {"MRI-CT": 0.0, "MRI-PET": 0.0, "MRI-SPECT": 0.0}
# per pair type: training-time dimming of the MRI alone (0: none; x: per-image MRI gain in
# [1-x, 1], requantised to 8 bits, the stage-1 supervision recomputed on the dimmed pair). The
# general intensity augmentation above re-lights both sources; this one teaches the case seen in
# the MRI-PET benchmark pairs, an MRI at ~70 % of the atlas level beside a PET at its own.
MRI_DIM: dict[str, float] = {"MRI-CT": 0.0, "MRI-PET": 0.0, "MRI-SPECT": 0.0}
# per pair type: whether the stage-1 model joins the val references (a checkpoint then counts a
# metric only where it beats every classical fuser *and* the model it was refined from, so it
# cannot sell a metric stage 1 already wins for one it does not)
VAL_AGAINST_STAGE1: dict[str, bool] = {"MRI-CT": False, "MRI-PET": False, "MRI-SPECT": False}


# conditions for diagnostics only (benchmarks/research/), never used to pick a checkpoint:
# "moving-x1.7" brightens the moving image (clipped at full scale); on the MRI-SPECT val pairs
# (axial T1/T2 MRIs) it brings the SPECT luma to the benchmark PET's level (mean 116 against 120),
# a PET-like validation set with the benchmark's kind of MRI.
# "mri-gamma2" darkens the MRI's mid-tones and keeps its texture: under the PET uptake of
# the MRI-PET val pairs it brings the MRI from mean 133 / local (7x7) SD 28 to ~69 / ~29, what the
# benchmark's MRI-PET inputs show there (66 / 25); "mri-x0.7" dims the texture with the level
# (101 / 19). Input statistics only; with it the val change over stage 1 reproduces the benchmark
# change of the edge-step looks (docs/research/pet-edge-step.md).
DIAGNOSTIC_CONDITIONS: dict[str, tuple[float, float, float, float]] = {
    "moving-x1.7": (1.0, 1.0, 1.7, 1.0),
    "mri-gamma2": (1.0, 2.0, 1.0, 1.0),
}


def condition(name: str) -> tuple[float, float, float, float]:
    """(MRI gain, MRI gamma, moving gain, moving gamma) of intensity condition ``name``."""
    if name in INTENSITY_CONDITIONS:
        return INTENSITY_CONDITIONS[name]
    if name in DIAGNOSTIC_CONDITIONS:
        return DIAGNOSTIC_CONDITIONS[name]
    known = [*INTENSITY_CONDITIONS, *DIAGNOSTIC_CONDITIONS]
    raise ValueError(f"unknown intensity condition {name!r}; one of {known}")


def apply_condition(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources under intensity condition ``name`` (:data:`INTENSITY_CONDITIONS` or
    :data:`DIAGNOSTIC_CONDITIONS`), clipped to full scale and requantised to 8 bits."""
    ga, pa, gb, pb = condition(name)
    if (ga, pa, gb, pb) == (1.0, 1.0, 1.0, 1.0):
        return a, b

    def q(x: torch.Tensor, gain: float, gamma: float) -> torch.Tensor:
        return torch.round((gain * x.clamp(0, 1) ** gamma).clamp(0, 1) * 255.0) / 255.0

    return q(a, ga, pa), q(b, gb, pb)


def random_intensity(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Per image and channel: gain in [1 - strength, 1], gamma in [1/(1+strength), 1+strength]."""
    n, c = x.shape[:2]
    gain = 1.0 - strength * torch.rand(n, c, 1, 1, generator=gen)
    gamma = torch.exp((2 * torch.rand(n, c, 1, 1, generator=gen) - 1) * np.log1p(strength))
    return gain * x.clamp(0, 1) ** gamma


def dim_mri(a: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """MRI batch (N,1,H,W) in [0,1] times a per-image gain in [1 - strength, 1], requantised to 8 bits."""
    gain = 1.0 - strength * torch.rand(a.shape[0], 1, 1, 1, generator=gen)
    return torch.round(gain.to(a.device) * a.clamp(0, 1) * 255.0) / 255.0


def darken_mri(a: torch.Tensor, gamma: float, gen: torch.Generator) -> torch.Tensor:
    """MRI batch (N,1,H,W) in [0,1] through a per-image gamma in [1, ``gamma``], requantised to 8 bits.

    Darkens the mid-tones and keeps the texture (``mri-gamma2`` as a training case): the MRI under
    the PET uptake of the benchmark's MRI-PET pairs is darker than the atlas val MRIs there and as
    textured.
    """
    g = 1.0 + (gamma - 1.0) * torch.rand(a.shape[0], 1, 1, 1, generator=gen)
    return torch.round(a.clamp(0, 1) ** g.to(a.device) * 255.0) / 255.0


def reward_weights(pair_type: str, overrides: list[str] | tuple[str, ...]) -> dict[str, float]:
    """The pair type's :data:`REWARD_WEIGHTS` with ``METRIC=W`` overrides applied (W = 0 drops the metric)."""
    if pair_type not in REWARD_WEIGHTS:
        raise ValueError(f"unknown pair type {pair_type!r}; one of {sorted(REWARD_WEIGHTS)}")
    out = dict(REWARD_WEIGHTS[pair_type])
    for item in overrides:
        name, sep, value = str(item).partition("=")
        if not sep or name not in REWARDABLE:
            raise ValueError(f"reward weight must be METRIC=W, METRIC in {sorted(REWARDABLE)}; got {item!r}")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"reward weight of {name} is not a number: {value!r}") from None
        if w < 0 or not np.isfinite(w):
            raise ValueError(f"reward weight of {name} must be >= 0, got {value}")
        out[name] = w
    out = {k: w for k, w in out.items() if w > 0}
    if not out:
        raise ValueError("every reward weight is 0: nothing to refine for")
    return out


def case_of(aanlib_id: str) -> str:
    """The atlas case of a slice id (``25015`` -> ``25``: case number, then a 3-digit slice number)."""
    aid = str(aanlib_id).strip()
    if not aid.isdigit() or len(aid) < 4:
        raise ValueError(f"cannot read a case from aanlib_id {aanlib_id!r}")
    return aid[:-3]


def cases(eval_root: Path, pair_type: str) -> dict[str, str]:
    """Pair name -> atlas case, from ``harvard/<pair_type>/manifest.csv`` (benchmark rows left out)."""
    rows = read_manifest(Path(eval_root) / "harvard" / pair_type)
    return {r["name"]: case_of(r["aanlib_id"]) for r in rows if r.get("split") != "benchmark"}


def load_split(
    eval_root: Path,
    pair_type: str,
    split: str | tuple[str, ...],
    case_in: set[str] | None = None,
    case_out: set[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(a, b) (N,1,H,W) in [0,1] of split(s) of ``harvard/<pair_type>``, benchmark images left out.

    ``case_in`` / ``case_out`` keep only / drop the rows of those atlas cases (:func:`case_of`).
    """
    splits = (split,) if isinstance(split, str) else tuple(split)
    if "benchmark" in splits:
        raise ValueError("benchmark rows are never used for training or validation")
    ps = load_pairs(Path(eval_root) / "harvard" / pair_type, pair_type, splits)
    if case_in is not None or case_out is not None:
        case = cases(eval_root, pair_type)
        sel = [
            i
            for i, n in enumerate(ps.names)
            if (case_in is None or case[n] in case_in) and (case_out is None or case[n] not in case_out)
        ]
        ps.names, ps.splits = [ps.names[i] for i in sel], [ps.splits[i] for i in sel]
        ps.a, ps.b = ps.a[sel], ps.b[sel]
    if not ps.names:
        raise ValueError(f"no {'/'.join(splits)} rows for {pair_type} under {eval_root}/harvard")
    bench = benchmark_hashes(Path(eval_root))
    keep = [
        i
        for i in range(len(ps.names))
        if pixel_hash(ps.a[i]) not in bench and pixel_hash(ps.b[i]) not in bench
    ]
    hashes = sorted({pixel_hash(ps.a[i]) for i in keep} | {pixel_hash(ps.b[i]) for i in keep})

    def as_t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x[keep].astype(np.float32) / 255.0)[:, None]

    return as_t(ps.a), as_t(ps.b), hashes


def fuse_batched(net: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """``net`` on sources (N,1,H,W) in batches of 16 on ``dev``, clamped to [0, 1], on the CPU."""
    with torch.inference_mode():
        return torch.cat(
            [
                net(a[i : i + 16].to(dev), b[i : i + 16].to(dev)).clamp(0, 1).cpu()
                for i in range(0, a.shape[0], 16)
            ]
        )


def mean_metrics(f: torch.Tensor, a8: np.ndarray, b8: np.ndarray) -> dict[str, float]:
    """Mean of each of the nine metrics of fused ``f`` (N,1,H,W) in [0,1], scored as stored (8 bits)."""
    return {k: float(v.mean()) for k, v in evaluate(to_u8(f), a8, b8).items()}


def reference_means(
    a: torch.Tensor, b: torch.Tensor, a8: np.ndarray, b8: np.ndarray
) -> dict[str, dict[str, float]]:
    """Mean metrics of every classical fuser of :data:`VAL_REFERENCES` on sources (N,1,H,W)."""
    out = {}
    for m in VAL_REFERENCES:
        fused = np.asarray(get_fuser(m).fuse(a[:, 0].numpy(), b[:, 0].numpy()), dtype=np.float32)
        out[m] = mean_metrics(torch.from_numpy(fused)[:, None].clamp(0, 1), a8, b8)
    return out


def val_score(ours: dict[str, float], refs: dict[str, dict[str, float]]) -> tuple[int, float]:
    """(metrics on which ``ours`` beats every reference, summed relative margin over the best one)."""
    firsts, margin = 0, 0.0
    for k in METRIC_NAMES:
        best = max(r[k] for r in refs.values())
        firsts += ours[k] > best
        margin += (ours[k] - best) / max(abs(best), 1e-6)
    return firsts, margin


def refine(
    eval_root: Path,
    pair_type: str,
    out_path: Path,
    init: Path = WEIGHTS_FILE,
    steps: int = 300,
    batch_size: int = 6,
    lr: float | None = None,
    lam: float | None = None,
    cap: float | None = None,
    weights: dict[str, float] | None = None,
    references: tuple[str, ...] | None = None,
    stage1_floor: tuple[str, ...] | None = None,
    floor_cap: float | None = None,
    down_stride: int | None = None,
    keep_saturated: bool | None = None,
    keep_lone_source: bool | None = None,
    seed: int = 0,
    device: str = "auto",
    val_every: int = 50,
    holdout_case: str | None = None,
    pick: str = "val",
    intensity_augment: float | None = None,
    mri_dim: float | None = None,
    mri_gamma: float = 1.0,
    val_conditions: tuple[str, ...] | None = None,
    val_against_stage1: bool | None = None,
    keep_checkpoints: Path | None = None,
    edge_target: tuple[float, ...] | None = None,
    select_target: tuple[float, float, int] | None = None,
    lone_rim: int | None = None,
    edge_select: tuple[float, float, int] | None = None,
    edge_anchor: str | None = None,
    also_train: str | None = None,
    also_gain: float = 1.0,
    also_cases: set[str] | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Fine-tune ``init`` for ``pair_type``; write the val-picked checkpoint to ``out_path``; return its meta.

    ``lr``, ``lam`` and ``cap`` default to :data:`HYPERPARAMETERS` of the pair type,
    ``intensity_augment`` to :data:`INTENSITY_AUGMENT`, ``mri_dim`` to :data:`MRI_DIM`;
    ``mri_gamma`` > 1: the MRI also goes through a random per-image gamma in [1, ``mri_gamma``]
    while training (:func:`darken_mri`),
    ``val_conditions`` to :data:`VAL_CONDITIONS` (the val score is summed over them),
    ``val_against_stage1`` to :data:`VAL_AGAINST_STAGE1` (the stage-1 model joins the classical
    fusers the checkpoint must beat on val). ``edge_target`` ``(lam, gain[, both])``: the supervision is
    the stage-1 image with the MRI's stronger edges (with ``both`` = 1 also the moving image's
    stronger edges) grafted in where both sources have signal
    (:func:`dicomnode.fusion.classical.graft_stronger_edges`), made per batch.
    ``select_target`` ``(amount, gain, soft)``: the supervision is the stage-1 image moved by
    ``amount`` towards the sources' stronger edges inside the overlap
    (:func:`dicomnode.fusion.classical.select_edges_in_overlap`), made per batch.
    ``lone_rim``: the refined model's ``lone_rim`` (pixels within this many of the air where one
    source alone has signal show that source unchanged; default: the init model's).
    ``edge_select`` ``(amount, gain, soft)``: the refined model's fixed output step (FusionNet
    ``edge_select``: select_edges_in_overlap after the blend; default: the init model's).
    ``edge_anchor`` ("max" or "base"): what the edge image of ``select_target`` and of the
    model's step is held to (default "max"; the model's: the init model's).
    ``also_train``: the ``train`` rows of another pair type (only atlas cases ``also_cases`` when
    given) join the training pairs, their moving image times ``also_gain`` (clipped, 8 bits):
    e.g. MRI-SPECT x1.7 as PET-like pairs with axial T1/T2 MRIs. Validation is unchanged.
    """
    if pair_type not in MODALITY_OF_TYPE:
        raise ValueError(f"unknown pair type {pair_type!r}; one of {sorted(MODALITY_OF_TYPE)}")
    weights = dict(weights or REWARD_WEIGHTS[pair_type])
    hp = HYPERPARAMETERS[pair_type]
    references = tuple(references or REWARD_REFERENCES[pair_type])
    unknown = set(references) - {"max", "laplacian-pyramid", "stage1"}
    if unknown or not references:
        raise ValueError(f"reward references must be among max, laplacian-pyramid, stage1; got {references}")
    floors = tuple(STAGE1_FLOOR[pair_type] if stage1_floor is None else stage1_floor)
    if set(floors) - set(weights):
        raise ValueError(f"stage-1 floor metrics must be rewarded metrics {sorted(weights)}; got {floors}")
    lr = hp["lr"] if lr is None else lr
    lam = hp["lam"] if lam is None else lam
    cap = hp["cap"] if cap is None else cap
    floor_cap = cap if floor_cap is None else float(floor_cap)
    if cap <= 0 or floor_cap < 0:
        raise ValueError(f"reward cap must be > 0 and floor cap >= 0, got {cap} and {floor_cap}")
    aug = INTENSITY_AUGMENT[pair_type] if intensity_augment is None else float(intensity_augment)
    if not 0.0 <= aug < 1.0:
        raise ValueError(f"intensity augmentation must be in [0, 1), got {aug}")
    dim = MRI_DIM[pair_type] if mri_dim is None else float(mri_dim)
    if not 0.0 <= dim < 1.0:
        raise ValueError(f"MRI dimming must be in [0, 1), got {dim}")
    if not 1.0 <= mri_gamma <= 4.0:
        raise ValueError(f"MRI gamma must be in [1, 4], got {mri_gamma}")
    if edge_target is not None and (len(edge_target) not in (2, 3) or min(edge_target[:2]) <= 0):
        raise ValueError(f"edge_target must be (lam, gain[, both]) with lam, gain > 0, got {edge_target}")
    if select_target is not None:
        if edge_target is not None:
            raise ValueError("give edge_target or select_target, not both")
        ok = len(select_target) == 3 and 0 < select_target[0] <= 1 and select_target[1] > 0
        if not ok or select_target[2] < 0:
            raise ValueError(f"select_target needs 0 < amount <= 1, gain > 0, soft >= 0: {select_target}")
    if lone_rim is not None and int(lone_rim) < 0:
        raise ValueError(f"lone_rim must be >= 0, got {lone_rim}")
    if edge_anchor not in (None, "max", "base"):
        raise ValueError(f"edge_anchor must be 'max' or 'base', got {edge_anchor!r}")
    # the supervision is then made per batch (on the re-lit pair / with the edges grafted in)
    relight = aug > 0 or dim > 0 or mri_gamma > 1 or edge_target is not None or select_target is not None
    conditions = tuple(val_conditions or VAL_CONDITIONS[pair_type])
    for c in conditions:
        condition(c)  # names checked before any work
        if c not in INTENSITY_CONDITIONS:
            raise ValueError(f"{c!r} is a diagnostic condition; pick over {list(INTENSITY_CONDITIONS)}")
    vs_stage1 = VAL_AGAINST_STAGE1[pair_type] if val_against_stage1 is None else bool(val_against_stage1)
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    dev = resolve_device(device)
    if val_every < 1:
        raise ValueError(f"val_every must be >= 1, got {val_every}")
    if pick not in ("val", "last"):
        raise ValueError(f"pick must be 'val' or 'last', got {pick!r}")
    if holdout_case is None:
        a_tr, b_tr, h_tr = load_split(eval_root, pair_type, "train")
        a_va, b_va, h_va = load_split(eval_root, pair_type, "val")
    else:  # case-held-out validation: train on the other atlas cases, validate on every row of this one
        known = sorted(set(cases(eval_root, pair_type).values()), key=int)
        if holdout_case not in known:
            raise ValueError(f"no atlas case {holdout_case!r} in {pair_type}; cases: {', '.join(known)}")
        a_tr, b_tr, h_tr = load_split(eval_root, pair_type, ("train", "val"), case_out={holdout_case})
        a_va, b_va, h_va = load_split(eval_root, pair_type, ("train", "val"), case_in={holdout_case})
    if also_train is not None:
        if also_train not in MODALITY_OF_TYPE or also_train == pair_type:
            raise ValueError(f"also_train must be another pair type than {pair_type}, got {also_train!r}")
        if not 0 < also_gain <= 4:
            raise ValueError(f"also_gain must be in (0, 4], got {also_gain}")
        a_x, b_x, h_x = load_split(eval_root, also_train, "train", case_in=also_cases)
        b_x = torch.round((b_x * also_gain).clamp(0, 1) * 255.0) / 255.0
        a_tr, b_tr, h_tr = torch.cat([a_tr, a_x]), torch.cat([b_tr, b_x]), [*h_tr, *h_x]
    ck = load_checkpoint(Path(init))
    config = ck.get("config")
    teacher = build_net(config)
    teacher.load_state_dict(ck["state_dict"])
    teacher.eval().to(dev)
    # same weights, coefficients at another resolution / full-scale source pixels kept at full scale
    down_stride = DOWN_STRIDE[pair_type] if down_stride is None else int(down_stride)
    keep_saturated = KEEP_SATURATED[pair_type] if keep_saturated is None else bool(keep_saturated)
    keep_lone = KEEP_LONE_SOURCE[pair_type] if keep_lone_source is None else bool(keep_lone_source)
    config = {
        **(config or {}),
        "down_stride": down_stride,
        "keep_saturated": keep_saturated,
        "keep_lone_source": keep_lone,
        **({} if lone_rim is None else {"lone_rim": int(lone_rim)}),
        **({} if edge_select is None else {"edge_select": [float(v) for v in edge_select]}),
        **({} if edge_anchor is None else {"edge_anchor": edge_anchor}),
    }
    net = build_net(config)
    net.load_state_dict(ck["state_dict"])
    net.to(dev)
    lp = LaplacianPyramidFuser()
    with torch.inference_mode():  # with intensity augmentation the supervision is made per batch
        sup = torch.zeros_like(a_tr) if relight else fuse_batched(teacher, a_tr, b_tr, dev)
    val_sets: dict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]] = {}
    refs_by: dict[str, dict[str, dict[str, float]]] = {}
    for c in conditions:
        ac, bc = apply_condition(a_va, b_va, c)
        a8, b8 = to_u8(ac), to_u8(bc)
        val_sets[c] = (ac, bc, a8, b8)
        refs_by[c] = reference_means(ac, bc, a8, b8)
        if vs_stage1:  # the refinement must also beat the model it starts from
            refs_by[c]["stage1"] = mean_metrics(fuse_batched(teacher, ac, bc, dev), a8, b8)
    refs = refs_by[conditions[0]]

    def evaluate_val() -> tuple[tuple[int, float], dict[str, dict[str, float]]]:
        """(score summed over the conditions, metrics per condition)."""
        net.eval()
        per: dict[str, dict[str, float]] = {}
        firsts, margin = 0, 0.0
        for c, (ac, bc, a8, b8) in val_sets.items():
            per[c] = mean_metrics(fuse_batched(net, ac, bc, dev), a8, b8)
            k, g = val_score(per[c], refs_by[c])
            per[c]["firsts"] = k
            firsts, margin = firsts + k, margin + g
        net.train()
        return (firsts, margin), per

    def record(step: int, score: tuple[int, float], per: dict[str, dict[str, float]]) -> dict[str, Any]:
        main = {k: v for k, v in per[conditions[0]].items() if k != "firsts"}
        return {"step": step, "firsts": score[0], "margin": round(score[1], 4), **main, "by_condition": per}

    def save(path: Path, chosen: dict[str, Any], saved_as: str = "picked") -> dict[str, Any]:
        """Write ``chosen`` (a scored checkpoint) as a weights file with its meta; return the meta."""
        meta = {
            "name": f"{ck.get('meta', {}).get('name', 'li2021-cnn')}-refined",
            "version": f"r-{pair_type}-s{seed}-{chosen['step']}",
            "pair_type": pair_type,
            "best_step": chosen["step"],
            "val_firsts": chosen["val"][conditions[0]]["firsts"],
            "val_firsts_all": chosen["score"][0],
            "val_margin": round(chosen["score"][1], 4),
            "val_metrics": {k: v for k, v in chosen["val"][conditions[0]].items() if k != "firsts"},
            "val_by_condition": chosen["val"],
            "val_conditions": list(conditions),
            "val_against_stage1": vs_stage1,
            "intensity_augment": aug,
            "mri_dim": dim,
            "mri_gamma": mri_gamma,
            "edge_target": list(edge_target) if edge_target is not None else None,
            "select_target": list(select_target) if select_target is not None else None,
            "edge_anchor": edge_anchor,
            "also_train": None
            if also_train is None
            else {"pair_type": also_train, "gain": also_gain, "cases": sorted(also_cases or [], key=int)},
            "val_references": refs,
            "val_references_by_condition": refs_by,
            "val_history": history,
            "holdout_case": holdout_case,
            "pick": pick,
            "saved_as": saved_as,
            "reward_weights": weights,
            "reward_references": list(references),
            "stage1_floor": list(floors),
            "steps": steps,
            "lr": lr,
            "lam": lam,
            "cap": cap,
            "floor_cap": floor_cap,
            "batch_size": batch_size,
            "seed": seed,
            "train_seconds": round(time.time() - t0, 1),
            "device": str(dev),
            "n_train": int(a_tr.shape[0]),
            "n_val": int(a_va.shape[0]),
            "init": str(init),
            "command": command,
            "train_hashes": sorted(set(h_tr) | set(h_va)),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": chosen["state"], "config": config, "meta": meta}, path)
        return meta

    score0, per0 = evaluate_val()
    best: dict[str, Any] = {
        "score": score0,
        "step": 0,
        "val": per0,
        "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
    }
    history = [record(0, score0, per0)]
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    net.train()
    bar = tqdm(range(1, steps + 1), desc=f"train refine {pair_type}", disable=not progress, unit="step")
    for step in bar:
        idx = torch.randint(0, a_tr.shape[0], (batch_size,), generator=gen)
        x = torch.cat([a_tr[idx], b_tr[idx], sup[idx]], dim=1)
        if torch.rand(1, generator=gen) < 0.5:
            x = x.flip(-1)
        x = torch.rot90(x, int(torch.randint(0, 4, (1,), generator=gen)), dims=(-2, -1)).to(dev)
        a, b, t = x[:, 0:1], x[:, 1:2], x[:, 2:3]
        if aug > 0:
            ab = random_intensity(x[:, 0:2], aug, gen)
            a, b = ab[:, 0:1], ab[:, 1:2]
        if dim > 0:
            a = dim_mri(a, dim, gen)
        if mri_gamma > 1:
            a = darken_mri(a, mri_gamma, gen)
        if relight:  # the supervision follows the sources: stage 1 on the re-lit pair
            with torch.no_grad():
                t = teacher(a, b).clamp(0, 1)
                if edge_target is not None:
                    lam_e, gain_e = edge_target[0], edge_target[1]
                    both_e = len(edge_target) > 2 and bool(edge_target[2])
                    t = graft_stronger_edges(a, b, t, lam_e, gain_e, both_e).clamp(0, 1)
                if select_target is not None:
                    amount, gain_s, soft = select_target
                    anchor = edge_anchor or "max"
                    t = select_edges_in_overlap(a, b, t, amount, gain_s, int(soft), anchor=anchor).clamp(0, 1)
        pred = net(a, b).clamp(0, 1)
        with torch.no_grad():
            ref_fusions = []
            if "max" in references:
                ref_fusions.append(torch.maximum(a, b))
            if "laplacian-pyramid" in references:
                ref_fusions.append(lp.fuse_tensors(a, b).clamp(0, 1))
            if "stage1" in references:
                ref_fusions.append(t)
        floor_w = {k: w for k, w in weights.items() if k in floors}
        rest_w = {k: w for k, w in weights.items() if k not in floors}
        reward = metric_reward(pred, a, b, ref_fusions, rest_w, cap) if rest_w else pred.new_zeros(())
        if floor_w:  # these metrics must not fall below the stage-1 model's either
            extra = [] if "stage1" in references else [t]
            reward = reward + metric_reward(pred, a, b, ref_fusions + extra, floor_w, floor_cap)
        loss = fusion_loss(pred, t) - lam * reward
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % val_every == 0 or step == steps:
            score, vals = evaluate_val()
            history.append(record(step, score, vals))
            improved = score > best["score"] or (pick == "last" and step == steps)
            if improved or keep_checkpoints is not None:
                state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                snap = {"score": score, "step": step, "val": vals, "state": state}
                if keep_checkpoints is not None:
                    save(Path(keep_checkpoints) / f"step-{step:04d}.pt", snap, "kept checkpoint")
                if improved:
                    best = snap
            n9 = 9 * len(conditions)
            bar.set_postfix(val_first=f"{score[0]}/{n9}", best=f"{best['score'][0]}/{n9}@{best['step']}")
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", reward=f"{reward.item():.4f}")
    meta = save(Path(out_path), best)
    log.info("%s: first on %d/9 on val at step %d -> %s", pair_type, best["score"][0], best["step"], out_path)
    return meta
