"""The one-shot job's models: BatchNorm classifiers, and the check that a site model has BatchNorm.

Synthesis inverts the running statistics of BatchNorm layers, so every site model and the
global model of the one-shot job use ``norm="batch"`` (elsewhere fedscan defaults to GroupNorm).
:class:`OneShotError` is the job's one error family (``protocol.errors`` model).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from learning.models import build_model
from protocol.errors import FedscanError, Reason

ONESHOT_NORM = "batch"


class OneShotError(FedscanError, ValueError):
    """A value the one-shot job refuses.

    No BatchNorm (``batchnorm_required``), no site models (``too_few_updates``), models that disagree
    on the classes (``shape_mismatch``), a bad config (``bad_config``, the default).
    """

    reason = Reason.BAD_CONFIG


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Return the model's BatchNorm layers in module order (those that keep running statistics)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def require_batchnorm(model: nn.Module, name: str = "model") -> None:
    """Refuse (``batchnorm_required``) a model without BatchNorm running statistics to invert."""
    if not batchnorm_layers(model):
        raise OneShotError(f"{name} has no BatchNorm layer with running statistics: one-shot synthesis "
                           f"inverts BatchNorm statistics (build it with norm='batch')",
                           reason=Reason.BATCHNORM_REQUIRED)


def bn_classifier(architecture: str = "small_cnn", **kwargs: object) -> nn.Module:
    """Build a fedscan classifier with BatchNorm (``norm`` is forced to ``"batch"``)."""
    kwargs = {**kwargs, "norm": ONESHOT_NORM}
    model = build_model(architecture, **kwargs)
    require_batchnorm(model, architecture)
    return model


def check_site_models(models: Sequence[nn.Module]) -> int:
    """Check the uploaded site models can form one teacher; return their number of classes.

    Needs at least one model, each with BatchNorm, all ending in the same number of classes
    (their architectures may differ).
    """
    if not models:
        raise OneShotError("no site models to distill", reason=Reason.TOO_FEW_UPDATES)
    classes = set()
    for i, m in enumerate(models):
        require_batchnorm(m, f"site model {i}")
        heads = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
        if not heads:
            raise OneShotError(f"site model {i} has no linear classifier head", reason=Reason.SHAPE_MISMATCH)
        classes.add(heads[-1].out_features)
    if len(classes) != 1:
        raise OneShotError(f"site models disagree on the number of classes: {sorted(classes)}",
                           reason=Reason.SHAPE_MISMATCH)
    return classes.pop()
