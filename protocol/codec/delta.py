"""``delta`` stage: send ``x - base`` instead of ``x``.

Error bound (float32 rounding only): ``|decode(encode(x)) - x| <= 2**-24 * (|x| + 2*|x - base|)``
elementwise, i.e. at most a couple of ulps; not bit-exact, which is why a pipeline
containing ``delta`` reports ``lossless == False``. Use the downlink codec for
bit-exact base-relative transfer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["delta_decode", "delta_encode"]

Flat = npt.NDArray[np.float32]


def delta_encode(flats: Sequence[Flat], bases: Sequence[Flat]) -> list[Flat]:
    """Elementwise ``x - base`` in float32."""
    return [np.subtract(x, b, dtype=np.float32) for x, b in zip(flats, bases, strict=True)]


def delta_decode(deltas: Sequence[Flat], bases: Sequence[Flat]) -> list[Flat]:
    """Elementwise ``delta + base`` in float32."""
    return [np.add(d, b, dtype=np.float32) for d, b in zip(deltas, bases, strict=True)]
