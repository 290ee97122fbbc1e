"""``ef`` stage: error feedback (a.k.a. error compensation / memory).

Before the lossy stages run, the residual left over from the previous round is
added to the update: ``c_t = x_t + r_{t-1}``. After the lossy stages that precede
``ef`` in the spec, the new residual is ``r_t = c_t - C(c_t)``, where ``C`` is the
reconstruction the receiver will see for those stages. Hence, telescoping,
``sum_{t<=T} C(c_t) = sum_{t<=T} x_t - r_T``: the cumulative transmitted update
differs from the cumulative true update by exactly the *current* residual, which
stays bounded (for top-k, ``|r_T|_inf`` is bounded by the largest dropped magnitude;
it does not grow with ``T``). Stated bound:
``|sum_t decode_t - sum_t x_t| = |r_T|`` elementwise (up to float32 rounding).

Placement rule: ``ef`` must directly follow a lossy stage and compensates *all*
lossy stages before it -- ``topk|ef|q:8`` feeds back only the top-k drop (the
unbiased quantisation noise is not accumulated), ``topk|q:8|ef`` and ``q:4|ef``
feed back everything.

The residual lives in :class:`ErrorFeedbackState` on the sending agent; it is keyed
by tensor name, survives ``save``/``load`` and is only updated after an encode
fully succeeds.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from protocol.errors import Reason

from .errors import CodecError
from .tensors import TensorSpec

__all__ = ["ErrorFeedbackState"]

Flat = npt.NDArray[np.float32]
_FORMAT_VERSION = 1


class ErrorFeedbackState:
    """Per-tensor residuals carried between rounds by an edge agent."""

    def __init__(self, residuals: Mapping[str, np.ndarray] | None = None) -> None:
        self._res: dict[str, Flat] = {}
        for name, arr in (residuals or {}).items():
            self._res[name] = np.array(arr, dtype=np.float32)

    # ----------------------------------------------------------------- accessors
    def __len__(self) -> int:
        return len(self._res)

    def __contains__(self, name: object) -> bool:
        return name in self._res

    def __iter__(self) -> Iterator[str]:
        return iter(self._res)

    def residual(self, name: str) -> Flat | None:
        """A copy of the residual for ``name`` (``None`` if none is held)."""
        r = self._res.get(name)
        return None if r is None else r.copy()

    def norms(self) -> dict[str, float]:
        """L2 norm of each residual."""
        return {k: float(np.linalg.norm(v.astype(np.float64))) for k, v in self._res.items()}

    def total_norm(self) -> float:
        """L2 norm of all residuals together."""
        return float(np.sqrt(sum(n * n for n in self.norms().values())))

    def max_abs(self) -> float:
        """Largest absolute residual entry (0.0 when empty)."""
        return max((float(np.max(np.abs(v))) for v in self._res.values() if v.size), default=0.0)

    def clear(self) -> None:
        """Forget every residual (e.g. after the base model changed)."""
        self._res.clear()

    # ------------------------------------------------------------- codec hooks
    def compensate(self, specs: Sequence[TensorSpec], flats: Sequence[Flat]) -> list[Flat]:
        """``x + r`` per tensor (``x`` where no residual is held)."""
        out: list[Flat] = []
        for spec, x in zip(specs, flats, strict=True):
            r = self._res.get(spec.name)
            if r is None:
                out.append(np.array(x, dtype=np.float32))
                continue
            if tuple(r.shape) != tuple(spec.shape):
                raise CodecError(
                    f"residual {spec.name!r} has shape {r.shape}, update has {spec.shape}",
                    reason=Reason.SHAPE_MISMATCH,
                )
            out.append(np.add(x, r.reshape(-1), dtype=np.float32))
        return out

    def commit(self, specs: Sequence[TensorSpec], residuals: Sequence[Flat]) -> None:
        """Replace the residuals of the given tensors (others are kept)."""
        for spec, r in zip(specs, residuals, strict=True):
            self._res[spec.name] = np.asarray(r, dtype=np.float32).reshape(spec.shape)

    # ------------------------------------------------------------- persistence
    def save(self, path: Path) -> None:
        """Atomically write the state (npz, no pickle) to ``path``."""
        path = Path(path)
        names = list(self._res)
        buf = io.BytesIO()
        # Positional arrays are stored as arr_0, arr_1, ... in ``names`` order.
        np.savez(
            buf,
            *(self._res[n] for n in names),
            version=np.array(_FORMAT_VERSION, dtype=np.int64),
            names=np.array(names, dtype=np.str_),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(buf.getvalue())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> ErrorFeedbackState:
        """Read a state written by :meth:`save`; a missing file gives an empty state."""
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            with np.load(path, allow_pickle=False) as z:
                version = int(z["version"])
                if version != _FORMAT_VERSION:
                    raise CodecError(f"unsupported state version {version}", reason=Reason.BAD_STATE)
                names = [str(n) for n in z["names"].tolist()]
                res = {n: np.array(z[f"arr_{i}"], dtype=np.float32) for i, n in enumerate(names)}
        except CodecError:
            raise
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise CodecError(f"cannot read {path}: {exc}", reason=Reason.BAD_STATE) from exc
        return cls(res)
