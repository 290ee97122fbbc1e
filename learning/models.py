"""Our own model zoo (no torchvision): ResNet-18, a small CNN, a U-Net and an autoencoder.

Every model takes a ``norm`` option: ``"group"`` (default; DP-SGD refuses BatchNorm, and
BatchNorm statistics suffer under label skew) or ``"batch"`` (one-shot synthesis inverts
BatchNorm statistics). ``build_model`` is the one factory used by agents, coordinator and export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

Norm = Literal["group", "batch"]


def make_norm(norm: Norm, channels: int) -> nn.Module:
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
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
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
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016). ``stem="small"`` is the 28x28 variant MedMNIST uses
    (3x3 conv, stride 1, no max-pool); ``stem="imagenet"`` is the 7x7/2 + max-pool stem for 224x224."""

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
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


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
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = up(x)
            x = dec(torch.cat([x, skip], dim=1))
        return self.head(x)


class AutoEncoder(nn.Module):
    """Convolutional autoencoder for anomaly detection trained on healthy scans only;
    the reconstruction error is the anomaly score."""

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
        z = self.encoder(x)
        h = self.decoder_fc(z).view(x.shape[0], 2 * self._w, self.size // 4, self.size // 4)
        return self.decoder(h)

    def anomaly_score(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mean((self(x) - x) ** 2, dim=(1, 2, 3))


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "unet": UNet,
    "autoencoder": AutoEncoder,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by architecture name; kwargs go to its constructor (recorded in the manifest)."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(_FACTORIES)}") from None
    return factory(**kwargs)


def model_kwargs_for(architecture: str, *, in_channels: int, num_classes: int, height: int, norm: Norm, width: int
                     ) -> dict[str, Any]:
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
    raise ValueError(f"unknown architecture {architecture!r}")
