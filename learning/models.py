"""Our own model zoo (no torchvision): ResNet-18, a small CNN, a U-Net and autoencoders.

Every model takes a ``norm`` option: ``"group"`` (default; DP-SGD refuses BatchNorm, and
BatchNorm statistics suffer under label skew) or ``"batch"`` (one-shot synthesis inverts
BatchNorm statistics). ``build_model`` is the one factory used by agents, coordinator and export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from learning.anomaly.model import AEConfig, DisentangledAE

Norm = Literal["group", "batch"]


def make_norm(norm: Norm, channels: int) -> nn.Module:
    """The normalization layer for ``channels``: GroupNorm (the default) or BatchNorm."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if (channels % g == 0 and channels // g >= 2) or g == 1)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {norm!r} (use 'group' or 'batch')")


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head; ~0.1 M parameters at width 32. Fast on a CPU."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 32, norm: Norm = "group") -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
            make_norm(norm, w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            make_norm(norm, 2 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
            make_norm(norm, 2 * w),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an NCHW batch."""
        out: torch.Tensor = self.classifier(torch.flatten(self.features(x), 1))
        return out


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with a shortcut (projected when the shape changes)."""
    def __init__(self, cin: int, cout: int, stride: int, norm: Norm) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = make_norm(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), make_norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for an NCHW batch."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        res: torch.Tensor = self.relu(out + self.downsample(x))
        return res


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016).

    ``stem="small"`` is the 28x28 variant MedMNIST uses (3x3 conv, stride 1, no max-pool); ``stem="imagenet"``
    is the 7x7/2 + max-pool stem for 224x224.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        norm: Norm = "group",
        stem: Literal["small", "imagenet"] = "small",
        width: int = 64,
    ) -> None:
        super().__init__()
        w = width
        if stem == "small":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w, 3, stride=1, padding=1, bias=False), make_norm(norm, w), nn.ReLU(inplace=True)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w, 7, stride=2, padding=3, bias=False),
                make_norm(norm, w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        layers: list[nn.Module] = []
        cin = w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride, norm), BasicBlock(cout, cout, 1, norm)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an NCHW batch."""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        out: torch.Tensor = self.fc(torch.flatten(self.pool(x), 1))
        return out


def _double_conv(cin: int, cout: int, norm: Norm) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        make_norm(norm, cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        make_norm(norm, cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015), ``depth`` levels, for segmentation (logits per pixel)."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 2, width: int = 16, depth: int = 3, norm: Norm = "group"
    ) -> None:
        super().__init__()
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans[:-1]:
            self.down.append(_double_conv(cin, c, norm))
            cin = c
        self.bottom = _double_conv(chans[-2], chans[-1], norm)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for c_hi, c_lo in zip(reversed(chans[1:]), reversed(chans[:-1]), strict=True):
            self.up.append(nn.ConvTranspose2d(c_hi, c_lo, 2, stride=2))
            self.dec.append(_double_conv(2 * c_lo, c_lo, norm))
        self.head = nn.Conv2d(chans[0], num_classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits for an NCHW batch."""
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = up(x)
            x = dec(torch.cat([x, skip], dim=1))
        out: torch.Tensor = self.head(x)
        return out


class AutoEncoder(nn.Module):
    """Convolutional autoencoder for anomaly detection trained on healthy scans only; the reconstruction error is the anomaly score."""

    def __init__(self, in_channels: int = 1, width: int = 16, latent: int = 32, norm: Norm = "group", size: int = 28):
        super().__init__()
        if size % 4:
            raise ValueError("autoencoder input size must be a multiple of 4")
        self.size = size
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, stride=2, padding=1), make_norm(norm, w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), make_norm(norm, 2 * w), nn.ReLU(inplace=True),
            nn.Flatten(), nn.Linear(2 * w * (size // 4) ** 2, latent),
        )
        self.decoder_fc = nn.Linear(latent, 2 * w * (size // 4) ** 2)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), make_norm(norm, w), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w, in_channels, 4, stride=2, padding=1),
        )
        self._w = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of an NCHW batch."""
        z = self.encoder(x)
        h = self.decoder_fc(z).view(x.shape[0], 2 * self._w, self.size // 4, self.size // 4)
        out: torch.Tensor = self.decoder(h)
        return out

    def anomaly_score(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared reconstruction error per image (higher is more anomalous)."""
        return torch.mean((self(x) - x) ** 2, dim=(1, 2, 3))


def _seg_unet(*, in_channels: int = 1, channels: list[int] | tuple[int, ...] = (8, 16, 32, 64),
              num_res_units: int = 1, norm: str = "instance") -> nn.Module:
    """The segmentation job's MONAI U-Net (``learning.segmentation.model``; MONAI is imported on first use)."""
    from learning.segmentation.model import SegModelConfig, build_unet

    return build_unet(SegModelConfig(in_channels=in_channels, channels=tuple(channels), num_res_units=num_res_units,
                                     norm=norm))  # type: ignore[arg-type]  # SegModelConfig refuses other norms


def _feddis_ae(*, size: int = 64, shape_widths: list[int] | tuple[int, ...] = (16, 32, 64),
               app_widths: list[int] | tuple[int, ...] = (8, 16, 16), groups: int = 4) -> nn.Module:
    """The anomaly job's disentangled autoencoder (``learning.anomaly.model``; FedDis shape/appearance branches)."""
    return DisentangledAE(AEConfig(size=size, shape_widths=tuple(shape_widths), app_widths=tuple(app_widths),
                                   groups=groups))


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "unet": UNet,
    "autoencoder": AutoEncoder,
    "seg_unet": _seg_unet,
    "feddis_ae": _feddis_ae,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by architecture name; kwargs go to its constructor (recorded in the manifest)."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(_FACTORIES)}") from None
    return factory(**kwargs)


def model_kwargs_for(architecture: str, *, in_channels: int, num_classes: int, height: int,
                     norm: Norm | Literal["instance"], width: int) -> dict[str, Any]:
    """Constructor kwargs for an architecture given a device profile's input spec."""
    if architecture == "small_cnn":
        return {"in_channels": in_channels, "num_classes": num_classes, "width": width, "norm": norm}
    if architecture == "resnet18":
        return {"in_channels": in_channels, "num_classes": num_classes, "norm": norm,
                "stem": "small" if height <= 64 else "imagenet"}
    if architecture == "unet":
        return {"in_channels": in_channels, "num_classes": num_classes, "norm": norm}
    if architecture == "autoencoder":
        return {"in_channels": in_channels, "norm": norm, "size": height}
    if architecture == "seg_unet":  # four levels from ``width`` features, doubling (learning.segmentation.model)
        return {"in_channels": in_channels, "channels": [width, 2 * width, 4 * width, 8 * width], "num_res_units": 1,
                "norm": norm}
    if architecture == "feddis_ae":  # 3 down-samplings when the size allows (64), else 2 (28); app branch half as wide
        levels = 3 if height % 8 == 0 else 2
        shape = [width * 2**i for i in range(levels)]
        app = [max(width // 2, 4) * 2**i for i in range(levels)]
        groups = next(g for g in (4, 2, 1) if all(w % g == 0 for w in (*shape, *app)))
        return {"size": height, "shape_widths": shape, "app_widths": app, "groups": groups}
    raise ValueError(f"unknown architecture {architecture!r}")
