"""FedDis' training objective, as pure functions of tensors.

``L = L1(x̂, x) + λ_S · SCL + λ_L · LOL`` (Bercea et al.):

- **shape consistency (SCL)**: the shape code of an image and of the same image under a random
  gamma (intensity) shift should agree, ``1 − cos(z_s(x), z_s(x^γ))``, the shifted code taken
  without gradient — anatomy must not depend on the scanner's intensity response;
- **latent orthogonality (LOL)**: the appearance code should not repeat the shape code,
  ``max(0, cos(z_a, P z_s))`` with ``P`` a fixed projection (the channel mean of ``z_s`` broadcast
  to ``z_a``'s channels, the reference's all-ones 1×1 convolution up to scale), ``z_s`` detached.

(The authors' later public release switched these terms off in its configuration and trained
with self-supervised masking instead — bright rectangles painted into the input, the clean image
as target: :func:`paint_hyperintensities`, on when ``TrainConfig.paint`` > 0.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossParts(NamedTuple):
    """The total loss and its terms (floats for logs are ``.item()`` of these)."""

    total: torch.Tensor
    recon: torch.Tensor
    scl: torch.Tensor
    lol: torch.Tensor


def gamma_shift(x: torch.Tensor, gen: torch.Generator, *, low: float = 0.5, high: float = 2.0) -> torch.Tensor:
    """``x ** γ`` per image, ``γ`` log-uniform in [low, high] (images in [0, 1])."""
    u = torch.rand(x.shape[0], generator=gen, dtype=x.dtype)
    gamma = torch.exp(torch.log(torch.tensor(low)) + u * (torch.log(torch.tensor(high)) - torch.log(torch.tensor(low))))
    return x.clamp(1e-6, 1.0) ** gamma.view(-1, *([1] * (x.dim() - 1)))


def paint_hyperintensities(x: torch.Tensor, gen: torch.Generator, *, max_rects: int, width: tuple[int, int],
                           foreground: float = 0.05) -> torch.Tensor:
    """Paint random bright rectangles over the foreground of copies of ``x``.

    Copies of ``x`` ``(B, 1, H, W)`` with up to ``max_rects`` random bright rectangles each
    (side in ``width`` px, intensity U(0.6, 1)), painted only over foreground pixels: the
    self-supervised masking of the FedDis release — the autoencoder learns to *remove*
    hyperintensities, so a real lesion leaves a residual instead of being copied.
    """
    out = x.clone()
    b, _, h, w = x.shape
    lo, hi = max(1, width[0]), max(1, min(width[1], h, w))
    for i in range(b):
        count = int(torch.randint(0, max_rects + 1, (1,), generator=gen))
        for _ in range(count):
            rh, rw = (int(v) for v in torch.randint(lo, hi + 1, (2,), generator=gen))
            y0 = int(torch.randint(0, h - rh + 1, (1,), generator=gen))
            x0 = int(torch.randint(0, w - rw + 1, (1,), generator=gen))
            value = 0.6 + 0.4 * float(torch.rand(1, generator=gen))
            patch = out[i, 0, y0:y0 + rh, x0:x0 + rw]
            out[i, 0, y0:y0 + rh, x0:x0 + rw] = torch.where(x[i, 0, y0:y0 + rh, x0:x0 + rw] > foreground,
                                                             torch.full_like(patch, value), patch)
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-8)


def shape_consistency(z_s: torch.Tensor, z_s_shifted: torch.Tensor) -> torch.Tensor:
    """Mean ``1 − cos`` between shape codes of the image and of its intensity-shifted copy."""
    return (1.0 - _cos(z_s, z_s_shifted.detach())).mean()


def latent_orthogonality(z_a: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
    """Mean ``max(0, cos(z_a, P z_s))``: appearance codes pushed off the (projected) shape codes."""
    proj = z_s.detach().mean(dim=1, keepdim=True).expand(-1, z_a.shape[1], -1, -1)
    if proj.shape != z_a.shape:
        proj = F.interpolate(proj, size=z_a.shape[-2:], mode="nearest")
    return torch.clamp(_cos(z_a, proj), min=0.0).mean()


def feddis_loss(x: torch.Tensor, recon: torch.Tensor, z_s: torch.Tensor, z_a: torch.Tensor,
                z_s_shifted: torch.Tensor | None, *, lambda_s: float, lambda_l: float) -> LossParts:
    """The total objective; with ``z_s_shifted`` None (or both λ zero) it is the plain L1 loss."""
    rec = F.l1_loss(recon, x)
    zero = rec.new_zeros(())
    scl = shape_consistency(z_s, z_s_shifted) if z_s_shifted is not None and lambda_s else zero
    lol = latent_orthogonality(z_a, z_s) if lambda_l else zero
    return LossParts(rec + lambda_s * scl + lambda_l * lol, rec, scl, lol)
