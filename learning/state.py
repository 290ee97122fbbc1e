"""Which model state travels: trainable float parameters plus listed buffers, as numpy.

BatchNorm running statistics are the listed buffers (``running_mean``, ``running_var``);
``num_batches_tracked``, fake-quant observers, optimizer state and anything else stay local.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from protocol.errors import FedscanError, Reason

TRAVELLING_BUFFERS = ("running_mean", "running_var")


def travelling_names(model: nn.Module) -> list[str]:
    """Names of the tensors that travel, in wire order: trainable float parameters, then the listed buffers."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    names += [n for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in TRAVELLING_BUFFERS and b.is_floating_point()]
    return names


def get_tensors(model: nn.Module) -> dict[str, np.ndarray]:
    """Copy the travelling tensors out of a model, in wire order, as float32 numpy arrays."""
    state = model.state_dict()
    return {n: state[n].detach().cpu().to(torch.float32).numpy().copy() for n in travelling_names(model)}


def set_tensors(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Load travelling tensors into a model; refuses missing/extra names or wrong shapes."""
    names = travelling_names(model)
    if list(tensors) != names:
        missing = sorted(set(names) - set(tensors))
        extra = sorted(set(tensors) - set(names))
        raise ValueError(f"tensor set does not match the model: missing {missing[:5]}, extra {extra[:5]}")
    state = model.state_dict()
    with torch.no_grad():
        for n, arr in tensors.items():
            if tuple(state[n].shape) != tuple(arr.shape):
                raise ValueError(f"{n}: shape {arr.shape} != model {tuple(state[n].shape)}")
            state[n].copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(state[n].dtype))


def get_named(model: nn.Module, names: list[str]) -> dict[str, np.ndarray]:
    """Copies of the named tensors as float32 numpy arrays, in the given order."""
    state = model.state_dict()
    return {n: state[n].detach().cpu().to(torch.float32).numpy().copy() for n in names}


def set_named(model: nn.Module, tensors: Mapping[str, np.ndarray], *, error: type[FedscanError] = FedscanError,
              check_finite: bool = False) -> None:
    """Load some travelling tensors (a job's shared or local part) into ``model``.

    Unknown names and wrong shapes raise ``error`` (the job's family) with ``shape_mismatch``;
    with ``check_finite``, NaN/inf raise it with ``non_finite`` — before anything is written.
    """
    state = model.state_dict()
    unknown = sorted(set(tensors) - set(travelling_names(model)))
    if unknown:
        raise error(f"tensors not in the model's travelling set: {unknown[:5]}", reason=Reason.SHAPE_MISMATCH)
    for n, arr in tensors.items():
        if tuple(state[n].shape) != tuple(np.shape(arr)):
            raise error(f"{n}: shape {np.shape(arr)} != model {tuple(state[n].shape)}", reason=Reason.SHAPE_MISMATCH)
        if check_finite and not np.isfinite(arr).all():
            raise error(f"{n}: non-finite values", reason=Reason.NON_FINITE)
    with torch.no_grad():
        for n, arr in tensors.items():
            state[n].copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(state[n].dtype))
