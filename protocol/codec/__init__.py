"""Pure, seeded compression codecs for federated model updates.

Public entry points: :func:`parse_codec` -> :class:`Pipeline` (uplink, lossy or
lossless, see :mod:`protocol.codec.pipeline` for the grammar and wire layout),
:class:`ErrorFeedbackState` (residual memory for ``ef``), and the bit-exact
:func:`downlink_encode` / :func:`downlink_decode` pair. Every failure is a
:class:`CodecError` carrying a machine ``reason``.
"""

from __future__ import annotations

from .downlink import downlink_decode, downlink_encode
from .ef import ErrorFeedbackState
from .errors import CODEC_REASONS, CodecError
from .pipeline import BOMB_FACTOR, Pipeline, parse_codec
from .tensors import Tensors, TensorSpec, specs_of

__all__ = [
    "BOMB_FACTOR",
    "CODEC_REASONS",
    "CodecError",
    "ErrorFeedbackState",
    "Pipeline",
    "TensorSpec",
    "Tensors",
    "downlink_decode",
    "downlink_encode",
    "parse_codec",
    "specs_of",
]
