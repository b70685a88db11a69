"""The generic architecture of the abstract's Figure 1, every knob a config field.

``n_conv`` convolutions of kernel ``k`` whose channels grow linearly from the input channels to
``max_channels`` (28 in the abstract), each down-sampling by ``downsample_factor`` (strided convolution or
max pooling) while the feature map stays at least ``min_size`` wide; a last convolution reduces to one
channel; flatten; ``n_fully`` fully connected layers whose widths decrease linearly to the 6 outputs
``(dx, dy, dz, phi_x, phi_y, phi_z)``.  Leaky ReLU followed by batch norm after every layer but the last,
tanh on the output.

The per-shot network (``docs/intra_scan.md``) is the same family with ``mask_channel=True`` (one more input
channel after the 4 per coil: the 0/1 mask of the rows the shot acquired, the moved input being the shot's
rows zero-filled on the reference's grid) and ``n_outputs=3`` ``(dx, dy, phi)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from torch import nn


@dataclass
class NetConfig:
    """Architecture of :class:`KMotionNet` (stored next to the weights)."""

    in_channels: int = 4
    """4 per coil: Re/Im of reference and moved crop (+ 1 with ``mask_channel``)."""
    crop: tuple[int, int] = (64, 64)
    """Input size ``(s_y_crop, s_x_crop)``."""
    n_conv: int = 4
    kernel_size: int = 5
    downsample: Literal["stride", "maxpool"] = "stride"
    downsample_factor: int = 2
    min_size: int = 4
    """No further down-sampling once a side would drop below this."""
    max_channels: int = 28
    n_fully: int = 3
    batch_norm: bool = True
    init: Literal["uniform", "xavier"] = "uniform"
    """Fully connected initialisation: uniform in ±``init_bound`` (abstract) or Xavier."""
    init_bound: float = 0.075
    leaky_slope: float = 0.01
    n_outputs: int = 6
    features: Literal["reim", "reim+mag", "reim+mag+cross"] = "reim"
    """Input representation computed inside the network from the 4 channels per coil: the abstract's
    Re/Im only, plus log-magnitudes of reference and moved (translation-invariant, carries the rotation),
    plus the normalised cross-power ``mov conj(ref) / |mov conj(ref)|`` (carries the translation ramp)."""
    mask_channel: bool = False
    """The last input channel is the 0/1 sample mask of the moved input (the per-shot network); it is passed
    through to the convolutions unchanged."""

    def __post_init__(self) -> None:
        self.crop = (int(self.crop[0]), int(self.crop[1]))
        checks = {
            "in_channels": self.in_channels >= 1,
            "n_conv": self.n_conv >= 1,
            "kernel_size": self.kernel_size >= 1,
            "downsample_factor": self.downsample_factor >= 1,
            "n_fully": self.n_fully >= 1,
            "max_channels": self.max_channels >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"NetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.downsample not in ("stride", "maxpool"):
            raise ValueError(f"NetConfig.downsample must be 'stride' or 'maxpool', got {self.downsample!r}")
        if self.features not in ("reim", "reim+mag", "reim+mag+cross"):
            raise ValueError(
                f"NetConfig.features must be reim, reim+mag or reim+mag+cross, got {self.features!r}"
            )
        if (self.in_channels - int(self.mask_channel)) % 4 or self.in_channels <= int(self.mask_channel):
            extra = " + 1 mask channel" if self.mask_channel else ""
            raise ValueError(f"NetConfig.in_channels must be 4 per coil{extra}, got {self.in_channels}")
        if self.init not in ("uniform", "xavier"):
            raise ValueError(f"NetConfig.init must be 'uniform' or 'xavier', got {self.init!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"NetConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


class KMotionNet(nn.Module):
    """Plain ``nn.Module`` rebuilt from a :class:`NetConfig`; input ``(B, in_channels, s_y, s_x)``."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        layers: list[nn.Module] = []
        size = list(cfg.crop)
        per_coil = {"reim": 4, "reim+mag": 6, "reim+mag+cross": 8}[cfg.features]
        n_mask = int(cfg.mask_channel)
        c_in = (cfg.in_channels - n_mask) // 4 * per_coil + n_mask
        for i in range(cfg.n_conv):
            c_out = round(cfg.in_channels + (cfg.max_channels - cfg.in_channels) * (i + 1) / cfg.n_conv)
            f = cfg.downsample_factor
            down = [f if s // f >= cfg.min_size else 1 for s in size]
            k = cfg.kernel_size
            layers.append(nn.ZeroPad2d(((k - 1) // 2, k // 2, (k - 1) // 2, k // 2)))  # "same" for any k
            if cfg.downsample == "stride" and max(down) > 1:
                layers.append(nn.Conv2d(c_in, c_out, k, stride=(down[0], down[1])))
                size = [(s - 1) // d + 1 for s, d in zip(size, down, strict=True)]
            else:
                layers.append(nn.Conv2d(c_in, c_out, k))
                if max(down) > 1:
                    layers.append(nn.MaxPool2d((down[0], down[1])))
                    size = [s // d for s, d in zip(size, down, strict=True)]
            layers.append(nn.LeakyReLU(cfg.leaky_slope))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 1))
        layers.append(nn.LeakyReLU(cfg.leaky_slope))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm2d(1))
        self.features = nn.Sequential(*layers)
        n_flat = size[0] * size[1]
        self.n_flat = n_flat
        widths = [round(n_flat + (cfg.n_outputs - n_flat) * i / cfg.n_fully) for i in range(cfg.n_fully + 1)]
        widths[-1] = cfg.n_outputs
        head: list[nn.Module] = []
        self.fully: list[nn.Linear] = []
        for i in range(cfg.n_fully):
            lin = nn.Linear(widths[i], widths[i + 1])
            self.fully.append(lin)
            head.append(lin)
            if i < cfg.n_fully - 1:
                head.append(nn.LeakyReLU(cfg.leaky_slope))
                if cfg.batch_norm:
                    head.append(nn.BatchNorm1d(widths[i + 1]))
        head.append(nn.Tanh())
        self.head = nn.Sequential(*head)
        self._init_fully()

    def _init_fully(self) -> None:
        for lin in self.fully:
            if self.config.init == "xavier":
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
            else:
                b = self.config.init_bound
                nn.init.uniform_(lin.weight, -b, b)
                nn.init.uniform_(lin.bias, -b, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.config.in_channels, *self.config.crop)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"KMotionNet: expected input (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(x.shape)}"
            )
        return self.head(self.features(self.represent(x)).flatten(1))

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        """Input features from the ``(Re ref, Im ref, Re mov, Im mov)`` channels of each coil (the mask
        channel, if any, is appended unchanged)."""
        if self.config.features == "reim":
            return x
        if self.config.mask_channel:
            return torch.cat([self._features(x[:, :-1]), x[:, -1:]], dim=1)
        return self._features(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = x.reshape(b, c // 4, 4, h, w)
        ref = torch.complex(q[:, :, 0].float(), q[:, :, 1].float())
        mov = torch.complex(q[:, :, 2].float(), q[:, :, 3].float())
        extra = [torch.log1p(ref.abs()), torch.log1p(mov.abs())]
        if self.config.features == "reim+mag+cross":
            cross = mov * ref.conj()
            cross = cross / (cross.abs() + 1e-6)
            extra += [cross.real, cross.imag]
        feats = torch.cat([q, torch.stack(extra, dim=2).to(x.dtype)], dim=2)
        return feats.reshape(b, -1, h, w)
