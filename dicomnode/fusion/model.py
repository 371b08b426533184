"""The learned fuser: a small supervised CNN after Li et al. (2021), trained on "successful fusion results".

Design (fast on a CPU, sharp at full resolution): a tiny fully-convolutional network looks at
both sources at 1/8 resolution (dilated convolutions, large context) and predicts, per pixel,
the coefficients of a linear blend of full-resolution *bases*: MRI, CT/luma, their pixel max and
min, max-abs selected fine and coarse detail bands, and a constant. The coefficients are smooth
(upsampled), the bases carry the edges, so the output keeps the sources' sharpness with no blocks
or halos; where both sources are 0 the output is 0. Any image size; batches on ``self.device``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dicomnode.fusion.classical import TorchFuser, select_edges_in_overlap

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "li2021-cnn"
WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / f"{DEFAULT_MODEL_NAME}.pt"
BASIS_NAMES = ("a", "b", "max", "min", "detail_fine", "detail_coarse", "one")
# pair type of the training data -> DICOM modality of the moving (b) image
MODALITY_OF_TYPE = {"MRI-CT": "CT", "MRI-PET": "PT", "MRI-SPECT": "NM"}


def weights_available(path: Path | None = None) -> bool:
    """True when the shipped weights file exists (then ``get_fuser('default')`` is this model)."""
    return (path or WEIGHTS_FILE).is_file()


def _select_detail(da: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    return torch.where(da.abs() >= db.abs(), da, db)


def binomial_blur(x: torch.Tensor) -> torch.Tensor:
    """5-tap binomial blur (two [1,2,1]/4 passes per axis) by shifted adds: much faster than conv2d."""
    for _ in range(2):
        p = F.pad(x, (1, 1, 1, 1), mode="replicate")
        h = p[..., :, :-2] + 2 * p[..., :, 1:-1] + p[..., :, 2:]
        x = (h[..., :-2, :] + 2 * h[..., 1:-1, :] + h[..., 2:, :]) * (1.0 / 16.0)
    return x


def coarse_blur(x: torch.Tensor) -> torch.Tensor:
    """Low-pass at ~4 px scale: 4x4 mean pooling, bilinear back to full size (any size)."""
    h, w = x.shape[-2:]
    if min(h, w) < 4:
        return x
    low = F.avg_pool2d(x, 4, ceil_mode=True, count_include_pad=False)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)


class FusionNet(nn.Module):
    """Two inputs (N,1,H,W) in [0,1] -> fused (N,1,H,W); coefficient net at 1/8 res over full-res bases."""

    def __init__(
        self,
        width: int = 16,
        dilations: tuple[int, ...] = (1, 2, 4, 8),
        down_stride: int = 2,
        keep_saturated: bool = False,
        keep_lone_source: bool = False,
        lone_rim: int = 0,
        edge_select: tuple[float, float, int] | None = None,
        edge_anchor: str = "max",
    ) -> None:
        super().__init__()
        if down_stride not in (1, 2):
            raise ValueError(f"down_stride must be 1 (coefficients at 1/4 res) or 2 (1/8), got {down_stride}")
        self.width = width
        self.dilations = tuple(dilations)
        self.down_stride = down_stride
        # a pixel at full scale in either source (bone clipped by the CT window, a saturated MRI)
        # stays at full scale, as in that source, instead of taking texture from the other one
        self.keep_saturated = bool(keep_saturated)
        # a pixel where only one source has signal (the other is 0: outside the PET uptake, air in
        # the CT window) shows that source unchanged, neither enhanced nor mixed
        self.keep_lone_source = bool(keep_lone_source)
        # a pixel where only one source has signal and that lies within ``lone_rim`` pixels of the
        # air (both sources 0: the head's outline, faint noise specks around it) shows that source
        # unchanged: the network does not enhance background noise or the skin line
        if int(lone_rim) < 0:
            raise ValueError(f"lone_rim must be >= 0, got {lone_rim}")
        self.lone_rim = int(lone_rim)
        # a fixed output step (no weights): inside the overlap the image moves by ``amount``
        # towards the gradient-domain image of the sources' stronger edges times ``gain``
        # (classical.select_edges_in_overlap, mask softened over ``soft`` pixels)
        self.edge_select: tuple[float, float, int] | None = None
        if edge_select is not None:
            amount, gain, soft = edge_select
            if not 0 <= float(amount) <= 1 or float(gain) <= 0 or int(soft) < 0:
                raise ValueError(f"edge_select needs 0 <= amount <= 1, gain > 0, soft >= 0: {edge_select}")
            self.edge_select = (float(amount), float(gain), int(soft))
        if edge_anchor not in ("max", "base"):
            raise ValueError(f"edge_anchor must be 'max' or 'base', got {edge_anchor!r}")
        self.edge_anchor = edge_anchor  # what the step's edge image is held to (select_edges_in_overlap)
        self.stem = nn.Conv2d(4, width, 3, stride=2, padding=1)  # on the 1/2-res input: 1/4 res
        self.down = nn.Conv2d(width, width, 3, stride=down_stride, padding=1)  # 1/8 res (stride 2)
        self.body = nn.ModuleList(nn.Conv2d(width, width, 3, padding=d, dilation=d) for d in self.dilations)
        self.head = nn.Conv2d(width, len(BASIS_NAMES), 1)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():  # start as pixel max: a strong, safe prior
            self.head.bias.zero_()
            self.head.bias[BASIS_NAMES.index("max")] = 1.0

    def bases(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N, len(BASIS_NAMES), H, W) full-resolution bases."""
        fa, fb = binomial_blur(a), binomial_blur(b)
        ca, cb = coarse_blur(fa), coarse_blur(fb)
        return torch.cat(
            [
                a,
                b,
                torch.maximum(a, b),
                torch.minimum(a, b),
                _select_detail(a - fa, b - fb),
                _select_detail(fa - ca, fb - cb),
                torch.ones_like(a),
            ],
            dim=1,
        )

    def coefficients(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-pixel blend coefficients at full resolution."""
        x = torch.cat([a, b, torch.maximum(a, b), (a - b).abs()], dim=1)
        if min(x.shape[-2:]) >= 2:
            x = F.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False)
        h = F.relu(self.stem(x))
        h = F.relu(self.down(h))
        for conv in self.body:
            h = h + F.relu(conv(h))
        c = self.head(h)
        return F.interpolate(c, size=a.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fused = (self.coefficients(a, b) * self.bases(a, b)).sum(1, keepdim=True)
        top = torch.maximum(a, b)
        if self.keep_saturated:
            fused = torch.where(top >= 1.0 - 0.5 / 255, torch.ones_like(fused), fused)
        if self.keep_lone_source:
            fused = torch.where(b <= 0.5 / 255, a, torch.where(a <= 0.5 / 255, b, fused))
        if self.edge_select is not None:
            amount, gain, soft = self.edge_select
            fused = select_edges_in_overlap(a, b, fused, amount, gain, soft, anchor=self.edge_anchor)
        if self.lone_rim > 0:
            fused = keep_lone_rim(a, b, fused, self.lone_rim)
        return torch.where(top <= 0.5 / 255, torch.zeros_like(fused), fused)


def keep_lone_rim(a: torch.Tensor, b: torch.Tensor, fused: torch.Tensor, width: int) -> torch.Tensor:
    """``fused`` with every pixel within ``width`` pixels of the air (both sources black) where one
    source alone has signal replaced by that source (FusionNet's ``lone_rim``)."""
    air = (torch.maximum(a, b) <= 0.5 / 255).to(fused.dtype)
    near = F.max_pool2d(air, 2 * width + 1, 1, width) > 0
    return torch.where(near & (b <= 0.5 / 255), a, torch.where(near & (a <= 0.5 / 255), b, fused))


def mix_with_max(net: FusionNet, alpha: float) -> FusionNet:
    """Make ``net`` output ``alpha * net + (1 - alpha) * max(a, b)``: rescale its linear head (no cost)."""
    with torch.no_grad():
        net.head.weight.mul_(alpha)
        net.head.bias.mul_(alpha)
        net.head.bias[BASIS_NAMES.index("max")] += 1.0 - alpha
    return net


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a weights file (a dict with ``state_dict``, ``config`` and ``meta``)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"fusion model weights not found at {path}; train them with 'dicomnode train fit' "
            "or choose a classical fusion.method"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a {DEFAULT_MODEL_NAME} weights file")
    return ckpt


def build_net(config: dict[str, Any] | None = None) -> FusionNet:
    cfg = dict(config or {})
    return FusionNet(
        width=int(cfg.get("width", 16)),
        dilations=tuple(cfg.get("dilations", (1, 2, 4, 8))),
        down_stride=int(cfg.get("down_stride", 2)),
        keep_saturated=bool(cfg.get("keep_saturated", False)),
        keep_lone_source=bool(cfg.get("keep_lone_source", False)),
        lone_rim=int(cfg.get("lone_rim", 0)),
        edge_select=None if cfg.get("edge_select") is None else tuple(cfg["edge_select"]),
        edge_anchor=str(cfg.get("edge_anchor", "max")),
    )


class CNNFuser(TorchFuser):
    """The node's default fuser: :class:`FusionNet` with the shipped weights, batched, inference mode."""

    name = DEFAULT_MODEL_NAME
    version = "1"
    batch_size = 16

    def __init__(
        self, device: str = "cpu", weights: str | Path | None = None, modality: str | None = None
    ) -> None:
        super().__init__(device)
        path = Path(weights) if weights is not None else WEIGHTS_FILE
        self._ckpt = load_checkpoint(path)
        self.modality: str | None = None
        self.meta = dict(self._ckpt.get("meta", {}))
        self.version = str(self.meta.get("version", "1"))
        self.net = build_net(self._ckpt.get("config"))
        self.net.load_state_dict(self._ckpt["state_dict"])
        self.net.eval().to(self.torch_device)
        if modality is not None:
            spec = self.for_modality(modality)
            self.modality, self.version, self.net = spec.modality, spec.version, spec.net

    @property
    def modalities(self) -> list[str]:
        """Moving modalities with their own specialised weights in the checkpoint."""
        return sorted(self._ckpt.get("per_modality", {}))

    def for_modality(self, moving_modality: str) -> CNNFuser:
        """The weights trained for MRI + ``moving_modality`` (CT, PT, NM) when shipped, else self."""
        m = (moving_modality or "").upper()
        if m == (self.modality or "").upper() or m not in self._ckpt.get("per_modality", {}):
            return self
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.modality = m
        entry = self._ckpt["per_modality"][m]
        clone.version = f"{self.meta.get('version', '1')}-{m}-{entry.get('meta', {}).get('version', '1')}"
        clone.net = build_net(entry.get("config"))
        clone.net.load_state_dict(entry["state_dict"])
        clone.net.eval().to(self.torch_device)
        return clone

    def fuse_tensors(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(a, b)
