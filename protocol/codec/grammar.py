"""The codec pipeline grammar: stage values and the parser of a spec string into stages.

Grammar (stages separated by ``|``, case-insensitive, whitespace ignored)::

    spec    := [delta] [topk] [ef] [value] [ef] [zstd]      (at most one ef)
    delta   := "delta"
    topk    := "topk:" FRACTION [":global" | ":tensor"]     0 < FRACTION <= 1
    ef      := "ef"                                         must follow topk or q
    value   := "raw" | "q:" BITS [":block=" N] | "sign" [":block=" N]
    zstd    := "zstd" [":" LEVEL]                           1 <= LEVEL <= 22

``ef`` compensates every lossy stage before it: ``topk|ef|q:8`` feeds back the top-k
drop only (q stays stochastic and unbiased), ``topk|q:8|ef`` / ``q:4|ef`` feed back
everything and make q round deterministically (EF needs a contractive compressor;
see :mod:`protocol.codec.quant` and :mod:`protocol.codec.ef`).

``BITS`` is 1, 2, 4 or 8 (``sign`` is ``q:1``), ``N`` >= 1. When no value stage is
given, ``raw`` is implied. :attr:`Pipeline.spec` is the canonical form: explicit
``raw``, ``sign`` written ``q:1``, default parameters omitted, lower case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.errors import Reason

from . import zstd as zstd_mod
from .errors import CodecError
from .quant import SUPPORTED_BITS

__all__ = [
    "DeltaStage",
    "EFStage",
    "QuantStage",
    "RawStage",
    "Stage",
    "TopKStage",
    "ZstdStage",
    "canonical",
    "parse_stages",
]

_MAX_BLOCK = 1 << 24


@dataclass(frozen=True)
class DeltaStage:
    """``delta``: encode the difference to the base model."""

    def token(self) -> str:
        """The stage as written in a canonical spec."""
        return "delta"


@dataclass(frozen=True)
class TopKStage:
    """``topk:F[:global]``: keep the largest fraction ``F`` of values, per tensor or over all."""

    fraction: float
    global_: bool = False

    def token(self) -> str:
        """The stage as written in a canonical spec."""
        return f"topk:{self.fraction!r}" + (":global" if self.global_ else "")


@dataclass(frozen=True)
class EFStage:
    """``ef``: error feedback for the lossy stages before it."""

    def token(self) -> str:
        """The stage as written in a canonical spec."""
        return "ef"


@dataclass(frozen=True)
class RawStage:
    """``raw``: float32 values, unquantised."""

    def token(self) -> str:
        """The stage as written in a canonical spec."""
        return "raw"


@dataclass(frozen=True)
class QuantStage:
    """``q:BITS[:block=N]`` (``sign`` is ``q:1``): stochastic quantisation with a scale per block."""

    bits: int
    block: int | None = None

    def token(self) -> str:
        """The stage as written in a canonical spec."""
        return f"q:{self.bits}" + ("" if self.block is None else f":block={self.block}")


@dataclass(frozen=True)
class ZstdStage:
    """``zstd[:LEVEL]``: entropy coding of the whole payload."""

    level: int = zstd_mod.DEFAULT_LEVEL

    def token(self) -> str:
        """The stage as written in a canonical spec."""
        return "zstd" if self.level == zstd_mod.DEFAULT_LEVEL else f"zstd:{self.level}"


Stage = DeltaStage | TopKStage | EFStage | RawStage | QuantStage | ZstdStage

_RANK: dict[type, int] = {
    DeltaStage: 0,
    TopKStage: 1,
    RawStage: 2,
    QuantStage: 2,
    ZstdStage: 3,
}


def _bad(token: str, why: str) -> CodecError:
    return CodecError(f"{token!r}: {why}", reason=Reason.BAD_PARAMETER)


def _parse_int(token: str, text: str, lo: int, hi: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise _bad(token, f"{text!r} is not an integer") from None
    if not lo <= v <= hi:
        raise _bad(token, f"{v} not in [{lo}, {hi}]")
    return v


def _parse_block(token: str, args: list[str]) -> int | None:
    if not args:
        return None
    if len(args) > 1 or not args[0].startswith("block="):
        raise _bad(token, "expected ':block=<n>'")
    return _parse_int(token, args[0][len("block=") :], 1, _MAX_BLOCK)


def _parse_stage(token: str) -> Stage:
    name, *args = token.split(":")
    if name == "delta" or name == "ef" or name == "raw":
        if args:
            raise _bad(token, f"{name} takes no parameters")
        return DeltaStage() if name == "delta" else EFStage() if name == "ef" else RawStage()
    if name == "topk":
        if not args or len(args) > 2:
            raise _bad(token, "expected topk:<fraction>[:global]")
        try:
            frac = float(args[0])
        except ValueError:
            raise _bad(token, f"{args[0]!r} is not a number") from None
        if not (math.isfinite(frac) and 0.0 < frac <= 1.0):
            raise _bad(token, "fraction must be in (0, 1]")
        mode = args[1] if len(args) == 2 else "tensor"
        if mode not in ("global", "tensor"):
            raise _bad(token, f"unknown top-k mode {mode!r}")
        return TopKStage(frac, mode == "global")
    if name == "q":
        if not args:
            raise _bad(token, "expected q:<bits>[:block=<n>]")
        bits = _parse_int(token, args[0], 1, 8)
        if bits not in SUPPORTED_BITS:
            raise _bad(token, f"bits must be one of {SUPPORTED_BITS}")
        return QuantStage(bits, _parse_block(token, args[1:]))
    if name == "sign":
        return QuantStage(1, _parse_block(token, args))
    if name == "zstd":
        if len(args) > 1:
            raise _bad(token, "expected zstd[:level]")
        if not args:
            return ZstdStage()
        return ZstdStage(_parse_int(token, args[0], zstd_mod.MIN_LEVEL, zstd_mod.MAX_LEVEL))
    raise CodecError(f"unknown codec stage {name!r} in {token!r}", reason=Reason.UNKNOWN_STAGE)


def parse_stages(spec: str) -> tuple[Stage, ...]:
    """Parse a pipeline spec such as ``"delta|topk:0.01|ef|q:8|zstd"`` into its stages (``raw`` made explicit)."""
    tokens = [t.strip().lower() for t in spec.split("|")]
    if not spec.strip():
        raise CodecError("codec spec is empty", reason=Reason.EMPTY_SPEC)
    if any(not t for t in tokens):
        raise CodecError(f"empty stage in {spec!r}", reason=Reason.BAD_ORDER)
    stages: list[Stage] = []
    last_rank = -1
    for tok in tokens:
        st = _parse_stage(tok)
        if isinstance(st, EFStage):
            if any(isinstance(s, EFStage) for s in stages):
                raise CodecError(f"'ef' appears twice in {spec!r}", reason=Reason.DUPLICATE_STAGE)
            if not stages or not isinstance(stages[-1], TopKStage | QuantStage):
                raise CodecError("'ef' must directly follow topk or q", reason=Reason.BAD_ORDER)
            stages.append(st)
            continue
        rank = _RANK[type(st)]
        if any(type(s) is type(st) for s in stages):
            raise CodecError(f"{tok!r} repeats a stage in {spec!r}", reason=Reason.DUPLICATE_STAGE)
        if rank <= last_rank:
            raise CodecError(f"{tok!r} is out of order in {spec!r}", reason=Reason.BAD_ORDER)
        last_rank = rank
        stages.append(st)
    if not any(isinstance(s, RawStage | QuantStage) for s in stages):
        pos = next((i for i, s in enumerate(stages) if isinstance(s, ZstdStage)), len(stages))
        stages.insert(pos, RawStage())
    return tuple(stages)


def canonical(stages: tuple[Stage, ...]) -> str:
    """Return the canonical spec of ``stages`` (explicit ``raw``, ``q:1`` for ``sign``, defaults left out)."""
    return "|".join(s.token() for s in stages)
