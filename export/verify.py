"""Compare an artifact's logits with the torch model's on real images (MONAI's verify=True idea).

An artifact is accepted only when its logits stay within ``Tolerance`` of torch's:
the largest absolute difference of any logit, and the share of images whose top-1 class
agrees. Accuracy against labels is reported beside them when labels are given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from export.errors import VerificationError


@dataclass(frozen=True)
class Tolerance:
    """Acceptance bounds. ``max_abs_diff=None`` checks agreement only (quantized artifacts)."""

    max_abs_diff: float | None
    min_top1_agreement: float


FP32_TOLERANCE = Tolerance(max_abs_diff=1e-3, min_top1_agreement=1.0)
FP16_TOLERANCE = Tolerance(max_abs_diff=5e-2, min_top1_agreement=0.99)
INT8_TOLERANCE = Tolerance(max_abs_diff=None, min_top1_agreement=0.98)


@dataclass(frozen=True)
class Verification:
    """What a verification measured; ``as_dict`` is what goes into ``Artifact.verification``."""

    samples: int
    max_abs_diff: float
    top1_agreement: float
    accuracy: float | None = None
    reference_accuracy: float | None = None

    def as_dict(self) -> dict[str, float | int | str]:
        """The check as manifest verification fields (missing figures left out)."""
        out: dict[str, float | int | str] = {
            "samples": self.samples,
            "max_abs_diff": round(self.max_abs_diff, 8),
            "top1_agreement": round(self.top1_agreement, 6),
        }
        if self.accuracy is not None:
            out["accuracy"] = round(self.accuracy, 6)
        if self.reference_accuracy is not None:
            out["reference_accuracy"] = round(self.reference_accuracy, 6)
        return out


def torch_logits(model: nn.Module, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """The reference: float32 logits of ``model`` in eval mode on CPU, batch by batch."""
    model = model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32))
            outs.append(model(x).float().cpu().numpy())
    return np.concatenate(outs, axis=0)


def batched(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """``predict`` over ``images`` in batches of ``batch_size``, outputs concatenated."""
    outs = [predict(np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32))
            for i in range(0, len(images), batch_size)]
    return np.concatenate(outs, axis=0)


def compare_logits(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    tolerance: Tolerance,
    what: str,
    labels: np.ndarray | None = None,
) -> Verification:
    """Measure ``candidate`` against ``reference``; raise ``VerificationError`` outside tolerance."""
    if reference.shape != candidate.shape:
        raise VerificationError(f"{what}: output shape {candidate.shape} != torch {reference.shape}")
    if not np.all(np.isfinite(candidate)):
        raise VerificationError(f"{what}: non-finite outputs")
    n = len(reference)
    if n == 0:
        raise VerificationError(f"{what}: no verification images")
    diff = float(np.max(np.abs(reference.astype(np.float64) - candidate.astype(np.float64))))
    ref_top1 = reference.argmax(axis=1)
    cand_top1 = candidate.argmax(axis=1)
    agreement = float(np.mean(ref_top1 == cand_top1))
    acc = ref_acc = None
    if labels is not None:
        y = np.asarray(labels).reshape(-1)
        acc = float(np.mean(cand_top1 == y))
        ref_acc = float(np.mean(ref_top1 == y))
    result = Verification(n, diff, agreement, acc, ref_acc)
    problems = []
    if tolerance.max_abs_diff is not None and diff > tolerance.max_abs_diff:
        problems.append(f"max abs diff {diff:.3g} > {tolerance.max_abs_diff:.3g}")
    if agreement < tolerance.min_top1_agreement:
        problems.append(f"top-1 agreement {agreement:.4f} < {tolerance.min_top1_agreement:.4f}")
    if problems:
        raise VerificationError(f"{what}: " + "; ".join(problems) + f" on {n} images")
    return result
