"""Command-line glue of training: `dicomnode train build-db|fit|refine|pack`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dicomnode.fusion.model import MODALITY_OF_TYPE, WEIGHTS_FILE
from dicomnode.fusion.training.data import PAIR_TYPES

DEFAULT_EVAL_ROOT = Path("../shared/eval")
DEFAULT_DB_DIR = Path("build/fusion-db")


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train`` with ``build-db`` and ``fit`` sub-commands to a top-level parser's subparsers."""
    train = subparsers.add_parser("train", help="build the fusion training database and fit the CNN")
    sub = train.add_subparsers(dest="train_command", required=True)

    db = sub.add_parser("build-db", help="run candidate fusers on train/val pairs, keep the best as targets")
    db.add_argument("--eval-root", type=Path, default=DEFAULT_EVAL_ROOT, help="folder holding harvard/")
    db.add_argument("--out", type=Path, default=DEFAULT_DB_DIR, help="database folder to write")
    db.add_argument("--types", nargs="+", default=list(PAIR_TYPES), choices=list(PAIR_TYPES))
    db.add_argument("--limit", type=int, default=None, help="at most this many pairs per type (smoke runs)")
    db.add_argument("--train-every", type=int, default=3, help="keep every k-th train row (all val rows)")
    db.add_argument("--device", default="cpu")
    db.set_defaults(func=_cmd_build_db)

    fit = sub.add_parser("fit", help="train the CNN on the database, keep the best checkpoint on val")
    fit.add_argument("--db", type=Path, default=DEFAULT_DB_DIR)
    fit.add_argument("--out", type=Path, default=WEIGHTS_FILE, help="weights file to write")
    fit.add_argument("--steps", type=int, default=2000)
    fit.add_argument("--batch-size", type=int, default=12)
    fit.add_argument("--crop", type=int, default=112)
    fit.add_argument("--lr", type=float, default=3e-3)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--width", type=int, default=24, help="channels of the coefficient network")
    fit.add_argument("--val-every", type=int, default=100)
    fit.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    fit.set_defaults(func=_cmd_fit)

    ref = sub.add_parser(
        "refine", help="metric-aware fine-tuning of the model for one pair type (val-picked)"
    )
    ref.add_argument("--type", dest="pair_type", required=True, choices=list(PAIR_TYPES))
    ref.add_argument("--eval-root", type=Path, default=DEFAULT_EVAL_ROOT, help="folder holding harvard/")
    ref.add_argument("--init", type=Path, default=WEIGHTS_FILE, help="stage-1 weights (the general model)")
    ref.add_argument("--out", type=Path, required=True, help="weights file to write")
    ref.add_argument("--steps", type=int, default=300)
    ref.add_argument("--val-every", type=int, default=50, help="score a checkpoint on val every N steps")
    ref.add_argument(
        "--keep-checkpoints",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write every scored checkpoint to DIR/step-NNNN.pt (each a complete weights file)",
    )
    ref.add_argument("--lr", type=float, default=None, help="learning rate (default: per pair type)")
    ref.add_argument(
        "--lam",
        type=float,
        default=None,
        help="weight of the metric reward against supervision (default: per type)",
    )
    ref.add_argument(
        "--cap",
        type=float,
        default=None,
        help="relative gain above which a metric stops paying (default: per type)",
    )
    ref.add_argument(
        "--references",
        nargs="+",
        default=None,
        choices=["max", "laplacian-pyramid", "stage1"],
        help="fusions the metric reward measures gains against (default: per type)",
    )
    ref.add_argument(
        "--holdout-case",
        default=None,
        help="validate on every row of this atlas case and train on the other cases (e.g. 25)",
    )
    ref.add_argument(
        "--pick",
        choices=["val", "last"],
        default="val",
        help="keep the checkpoint best on validation (default) or the last one",
    )
    ref.add_argument(
        "--stage1-floor",
        nargs="*",
        default=None,
        choices=["SD", "SF", "AG", "SCD", "VIF", "Qabf", "SSIM", "Detail"],
        help="metrics whose reward also measures against the stage-1 model (default: per type)",
    )
    ref.add_argument(
        "--down-stride",
        type=int,
        choices=[1, 2],
        default=None,
        help="coefficient resolution of the refined model: 2 = 1/8 (stage 1), 1 = 1/4 (default: per type)",
    )
    ref.add_argument(
        "--keep-saturated",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the refined model keeps a pixel at full scale where either source is (default: per type)",
    )
    ref.add_argument(
        "--keep-lone-source",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the refined model shows a pixel where only one source has signal (the other is 0) as "
        "that source, unchanged (default: per type)",
    )
    ref.add_argument(
        "--intensity-augment",
        type=float,
        default=None,
        help="random per-source gain/gamma strength in [0, 1) while training (default: per type)",
    )
    ref.add_argument(
        "--floor-cap",
        type=float,
        default=None,
        help="saturation of the --stage1-floor metrics' reward above stage 1; 0 = a pure floor, no "
        "reward above it (default: --cap)",
    )
    ref.add_argument(
        "--mri-dim",
        type=float,
        default=None,
        help="dim the MRI alone by a random per-image gain in [1-x, 1] while training, x in [0, 1) "
        "(default: per type)",
    )
    ref.add_argument(
        "--mri-gamma",
        type=float,
        default=1.0,
        help="also darken the MRI's mid-tones by a random per-image gamma in [1, G] while training, "
        "G in [1, 4] (default 1: off)",
    )
    ref.add_argument(
        "--edge-target",
        type=_lam_gain,
        default=None,
        metavar="LAM,GAIN[,both]",
        help="supervise with the stage-1 image with the MRI's stronger edges grafted in where both "
        "sources have signal (gradient times GAIN, screened Poisson with weight LAM; with ',both' "
        "also the moving image's stronger edges; default: off)",
    )
    ref.add_argument(
        "--select-target",
        type=_select,
        default=None,
        metavar="AMOUNT,GAIN,SOFT",
        help="supervise with the stage-1 image moved by AMOUNT (0..1] towards the sources' stronger "
        "edges (gradient times GAIN) where both have signal, the step faded over SOFT pixels at the "
        "uptake's edge (default: off)",
    )
    ref.add_argument(
        "--edge-select",
        type=_select,
        default=None,
        metavar="AMOUNT,GAIN,SOFT",
        help="give the refined model the fixed output step of --select-target (it then fuses with "
        "it; default: as the init model)",
    )
    ref.add_argument(
        "--edge-anchor",
        choices=("max", "base"),
        default=None,
        help="what the edge image of --select-target and --edge-select is held to: the pixel max "
        "(default) or the image it is added to (edges only, no brightening)",
    )
    ref.add_argument(
        "--lone-rim",
        type=int,
        default=None,
        metavar="N",
        help="the refined model shows a pixel where one source alone has signal within N pixels of "
        "the air as that source, unchanged (default: as the init model; 0 = off)",
    )
    ref.add_argument(
        "--also-train",
        default=None,
        choices=list(PAIR_TYPES),
        help="add the train rows of this pair type to the training pairs (validation unchanged)",
    )
    ref.add_argument("--also-gain", type=float, default=1.0, help="gain on their moving image (e.g. 1.7)")
    ref.add_argument("--also-cases", nargs="+", default=None, metavar="CASE", help="only these atlas cases")
    ref.add_argument(
        "--val-conditions",
        nargs="+",
        default=None,
        help="intensity conditions the checkpoint is picked over: stored, mri-x0.7, moving-x0.7, "
        "mri-gamma1.5, moving-gamma1.5 (default: per type)",
    )
    ref.add_argument(
        "--val-against-stage1",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="count a val metric only where the checkpoint also beats the stage-1 model (default: per type)",
    )
    ref.add_argument(
        "--reward-weight",
        action="append",
        default=[],
        metavar="METRIC=W",
        help="override one reward weight (SD, SF, AG, SCD, VIF, Qabf, SSIM, or Detail: the MRI's "
        "structure kept where both sources have signal; 0 drops it); repeatable",
    )
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--device", default="auto")
    ref.set_defaults(func=_cmd_refine)

    pk = sub.add_parser("pack", help="write a weights file: the general model plus per-modality refinements")
    pk.add_argument("--base", type=Path, default=WEIGHTS_FILE, help="the general model")
    pk.add_argument(
        "--spec",
        action="append",
        default=[],
        metavar="MODALITY=PATH",
        help="a refined model for a moving modality (CT, PT, NM); repeatable",
    )
    pk.add_argument(
        "--keep",
        action="store_true",
        help="keep the per-modality entries of --base that no --spec names (default: only --spec's)",
    )
    pk.add_argument("--out", type=Path, default=WEIGHTS_FILE)
    pk.set_defaults(func=_cmd_pack)
    return train


def train_command(sub: str, argv: list[str] | None = None) -> str:
    """``dicomnode train <sub> <its arguments>`` as typed (for a weights file's meta), from ``sys.argv``.

    Works for ``dicomnode train <sub> ...`` and ``python -m dicomnode.fusion.training <sub> ...``
    alike: what follows the first ``sub`` is the command's arguments. "" when ``sub`` is not there.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if sub not in args:
        return ""
    return " ".join(["dicomnode", "train", sub, *args[args.index(sub) + 1 :]])


def _lam_gain(text: str) -> tuple[float, ...]:
    """``LAM,GAIN`` or ``LAM,GAIN,both`` (two positive numbers) for ``--edge-target``."""
    parts = text.split(",")
    both = len(parts) == 3 and parts[2] == "both"
    try:
        lam, gain = (float(p) for p in (parts[:2] if both else parts))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAM,GAIN[,both] (two numbers), got {text!r}") from None
    if lam <= 0 or gain <= 0:
        raise argparse.ArgumentTypeError(f"LAM and GAIN must be > 0, got {text!r}")
    return (lam, gain, 1.0) if both else (lam, gain)


def _select(text: str) -> tuple[float, float, int]:
    """``AMOUNT,GAIN,SOFT`` for ``--select-target``: 0 < AMOUNT <= 1, GAIN > 0, SOFT an integer >= 0."""
    parts = text.split(",")
    try:
        if len(parts) != 3:
            raise ValueError
        amount, gain, soft = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected AMOUNT,GAIN,SOFT (0.7,1.1,5), got {text!r}") from None
    if not 0 < amount <= 1 or gain <= 0 or soft < 0:
        raise argparse.ArgumentTypeError(f"need 0 < AMOUNT <= 1, GAIN > 0, SOFT >= 0; got {text!r}")
    return (amount, gain, soft)


def _cmd_refine(args: argparse.Namespace) -> int:
    from dicomnode.fusion.training.refine import refine, reward_weights  # noqa: PLC0415

    command = train_command("refine")
    try:
        weights = reward_weights(args.pair_type, args.reward_weight) if args.reward_weight else None
        meta = refine(
            args.eval_root,
            args.pair_type,
            args.out,
            init=args.init,
            steps=args.steps,
            val_every=args.val_every,
            keep_checkpoints=args.keep_checkpoints,
            lr=args.lr,
            lam=args.lam,
            cap=args.cap,
            references=tuple(args.references) if args.references else None,
            seed=args.seed,
            device=args.device,
            holdout_case=args.holdout_case,
            pick=args.pick,
            intensity_augment=args.intensity_augment,
            mri_dim=args.mri_dim,
            mri_gamma=args.mri_gamma,
            edge_target=args.edge_target,
            select_target=args.select_target,
            lone_rim=args.lone_rim,
            edge_select=args.edge_select,
            edge_anchor=args.edge_anchor,
            also_train=args.also_train,
            also_gain=args.also_gain,
            also_cases=set(args.also_cases) if args.also_cases else None,
            down_stride=args.down_stride,
            keep_saturated=args.keep_saturated,
            keep_lone_source=args.keep_lone_source,
            stage1_floor=tuple(args.stage1_floor) if args.stage1_floor is not None else None,
            floor_cap=args.floor_cap,
            val_conditions=tuple(args.val_conditions) if args.val_conditions else None,
            val_against_stage1=args.val_against_stage1,
            weights=weights,
            command=command,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"refine: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: first on {meta['val_firsts']}/9 on val (step {meta['best_step']})")
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from dicomnode.fusion.training.specialise import pack  # noqa: PLC0415

    specs = {}
    for item in args.spec:
        modality, sep, path = item.partition("=")
        if not sep or modality.upper() not in MODALITY_OF_TYPE.values():
            print(
                f"pack: --spec {item!r}: expected MODALITY=PATH with MODALITY one of CT, PT, NM",
                file=sys.stderr,
            )
            return 2
        specs[modality.upper()] = (Path(path), 1.0, {})
    try:
        entries = pack(args.base, specs, args.out, keep=args.keep)
    except (FileNotFoundError, ValueError) as exc:
        print(f"pack: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} with per-modality weights for {entries or 'none'}")
    return 0


def _cmd_build_db(args: argparse.Namespace) -> int:
    from dicomnode.fusion.training.build_db import LeakError, build_db  # noqa: PLC0415

    try:
        m = build_db(
            args.eval_root,
            args.out,
            tuple(args.types),
            limit=args.limit,
            device=args.device,
            train_every=args.train_every,
        )
    except (FileNotFoundError, LeakError) as exc:
        print(f"build-db: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(m['pairs'])} pairs to {args.out}")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from dicomnode.fusion.training.fit import fit  # noqa: PLC0415

    command = train_command("fit")
    try:
        meta = fit(
            args.db,
            args.out,
            steps=args.steps,
            batch_size=args.batch_size,
            crop=args.crop,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            val_every=args.val_every,
            width=args.width,
            command=command,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"fit: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: val loss {meta['val_loss']:.4f} at step {meta['best_step']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dicomnode.fusion.training build-db|fit|refine|pack ...`` (= ``dicomnode train ...``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m dicomnode.fusion.training")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["train", *argv] if argv and argv[0] != "train" else argv)
    return int(args.func(args))
