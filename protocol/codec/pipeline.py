"""The encode/decode driver that composes a parsed pipeline's stages, and its payload layout.

The grammar of a spec (``delta|topk:0.01|ef|q:8|zstd``) and its stages live in
:mod:`protocol.codec.grammar`; :func:`parse_codec` turns a spec into a :class:`Pipeline`.

Payload layout before ``zstd``:

* dense ``raw`` (no topk, no q): the v1 format, float32 LE concatenation, no header;
* otherwise ``varint n_tensors, varint n_elements`` then, for top-k, one
  ``varint k, varint index_bytes`` pair per section followed by every section's
  gap-coded indices, then the values: float32 LE for ``raw``, or all scales (float32
  LE) followed by the bit-packed codes for ``q``.

A *section* is one tensor (dense or per-tensor top-k) or, for ``topk:..:global``,
the concatenation of all tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protocol.errors import Reason

from . import zstd as zstd_mod
from .delta import delta_decode, delta_encode
from .ef import ErrorFeedbackState
from .errors import CodecError
from .grammar import DeltaStage, EFStage, QuantStage, RawStage, Stage, TopKStage, ZstdStage, canonical, parse_stages
from .quant import (
    block_count,
    dequantize,
    pack_codes,
    packed_size,
    quantize,
    unpack_codes,
)
from .raw import raw_decode, raw_encode
from .tensors import F32, Tensors, TensorSpec, base_flats, flatten_tensors, unflatten, validate_specs
from .topk import decode_indices, encode_indices, topk_count, topk_select
from .wire import Reader, varint_scalar

__all__ = [
    "BOMB_FACTOR",
    "DeltaStage",
    "EFStage",
    "Pipeline",
    "QuantStage",
    "RawStage",
    "Stage",
    "TopKStage",
    "ZstdStage",
    "parse_codec",
]

Flat = npt.NDArray[np.float32]

#: A zstd frame may inflate to at most this many times the raw float32 size.
BOMB_FACTOR = 4
_BOMB_SLACK = 1024  # headers of tiny tensor sets


def parse_codec(spec: str) -> Pipeline:
    """Parse a pipeline spec such as ``"delta|topk:0.01|ef|q:8|zstd"`` (grammar: :mod:`.grammar`)."""
    return Pipeline(parse_stages(spec))


@dataclass(frozen=True)
class _Section:
    """A contiguous run of the concatenated update: ``[start, start + n)``."""

    start: int
    n: int


class Pipeline:
    """A parsed, immutable codec pipeline. Build with :func:`parse_codec`."""

    def __init__(self, stages: tuple[Stage, ...]) -> None:
        self.stages = stages
        self.spec = canonical(stages)
        self.delta = any(isinstance(s, DeltaStage) for s in stages)
        self.topk = next((s for s in stages if isinstance(s, TopKStage)), None)
        self.quant = next((s for s in stages if isinstance(s, QuantStage)), None)
        zs = next((s for s in stages if isinstance(s, ZstdStage)), None)
        self.zstd_level = None if zs is None else zs.level
        ef_at = next((i for i, s in enumerate(stages) if isinstance(s, EFStage)), None)
        # Which lossy stages does ef compensate? "topk" only, or everything ("all").
        self.ef: str | None = None
        if ef_at is not None:
            self.ef = "topk" if isinstance(stages[ef_at - 1], TopKStage) and self.quant else "all"
        self.ef_after_quant = ef_at is not None and isinstance(stages[ef_at - 1], QuantStage)
        self.lossless = self.topk is None and self.quant is None and not self.delta
        self.needs_base = self.delta
        self.needs_state = self.ef is not None

    def __repr__(self) -> str:
        return f"parse_codec({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    @property
    def dense_raw(self) -> bool:
        """Whether the payload is v1's plain float32 concatenation (no top-k, no quantisation)."""
        return self.topk is None and self.quant is None

    # --------------------------------------------------------------- layout
    def _sections(self, sizes: Sequence[int]) -> list[_Section]:
        if self.topk is not None and self.topk.global_:
            return [_Section(0, sum(sizes))]
        starts = np.cumsum([0, *sizes])
        return [_Section(int(starts[i]), n) for i, n in enumerate(sizes)]

    def max_payload_body(self, total: int) -> int:
        """Largest pre-zstd body accepted for ``total`` elements (bomb guard)."""
        return BOMB_FACTOR * 4 * total + _BOMB_SLACK

    # --------------------------------------------------------------- encode
    def encode(
        self,
        tensors: Mapping[str, np.ndarray],
        *,
        base: Mapping[str, np.ndarray] | None = None,
        state: ErrorFeedbackState | None = None,
        seed: int = 0,
    ) -> bytes:
        """Encode ``tensors`` (ordered) into a payload; deterministic given ``seed``.

        ``base`` is required iff :attr:`needs_base`; ``state`` iff :attr:`needs_state`
        and is updated only when encoding succeeds.
        """
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise CodecError(f"seed must be a non-negative int, got {seed!r}", reason=Reason.BAD_PARAMETER)
        specs, xs = flatten_tensors(tensors)
        sizes = [s.size for s in specs]
        if self.delta:
            xs = delta_encode(xs, base_flats(base, specs))
        if self.ef is not None:
            if state is None:
                raise CodecError(f"{self.spec!r} needs an ErrorFeedbackState", reason=Reason.MISSING_STATE)
            xs = state.compensate(specs, xs)
        residuals: list[Flat] | None = None
        if self.dense_raw:
            body = raw_encode(xs)
        else:
            flat = np.concatenate(xs) if xs else np.zeros(0, dtype=np.float32)
            if not bool(np.all(np.isfinite(flat))):
                raise CodecError("lossy stages need finite inputs", reason=Reason.NON_FINITE)
            body, recon = self._encode_lossy(flat, sizes, seed)
            if self.ef is not None:
                residual = flat - recon
                offs = np.cumsum([0, *sizes])
                residuals = [residual[offs[i] : offs[i + 1]] for i in range(len(specs))]
        payload = body if self.zstd_level is None else zstd_mod.zstd_compress(body, self.zstd_level)
        if state is not None and residuals is not None:
            state.commit(specs, residuals)  # only once the whole encode has succeeded
        return payload

    def _encode_lossy(self, flat: Flat, sizes: Sequence[int], seed: int) -> tuple[bytes, Flat]:
        """Body for topk/q pipelines plus the reconstruction ``ef`` compensates."""
        parts: list[bytes] = [varint_scalar(len(sizes)), varint_scalar(flat.size)]
        sections = self._sections(sizes)
        values: list[Flat] = []
        indices: list[npt.NDArray[np.int64]] = []
        if self.topk is not None:
            idx_blobs: list[bytes] = []
            for sec in sections:
                seg = flat[sec.start : sec.start + sec.n]
                idx = topk_select(seg, topk_count(sec.n, self.topk.fraction))
                blob = encode_indices(idx)
                parts += [varint_scalar(idx.size), varint_scalar(len(blob))]
                idx_blobs.append(blob)
                indices.append(idx + sec.start)
                values.append(seg[idx])
            parts += idx_blobs
        else:
            values = [flat[sec.start : sec.start + sec.n] for sec in sections]
        recon_vals = values
        if self.quant is not None:
            # ef directly after q compensates the quantiser: use deterministic rounding
            # (contractive, see quant.py); otherwise unbiased stochastic rounding.
            rng = (
                None
                if self.ef_after_quant
                else np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x51])))
            )
            scales: list[Flat] = []
            codes: list[npt.NDArray[np.uint8]] = []
            for v in values:
                s, c = quantize(v, self.quant.bits, self.quant.block, rng)
                scales.append(s)
                codes.append(c)
            parts.append(np.concatenate(scales).astype(F32).tobytes() if scales else b"")
            all_codes = np.concatenate(codes) if codes else np.zeros(0, np.uint8)
            parts.append(pack_codes(all_codes, self.quant.bits))
            if self.ef == "all":
                recon_vals = [
                    dequantize(s, c, self.quant.bits, self.quant.block) for s, c in zip(scales, codes, strict=True)
                ]
        else:
            parts.append(raw_encode(values))
        if self.topk is None:
            recon = np.concatenate(recon_vals) if recon_vals else np.zeros(0, np.float32)
        else:
            recon = np.zeros(flat.size, dtype=np.float32)
            if indices:
                recon[np.concatenate(indices)] = np.concatenate(recon_vals)
        return b"".join(parts), recon

    # --------------------------------------------------------------- decode
    def decode(
        self,
        payload: bytes | bytearray | memoryview,
        *,
        specs: Sequence[TensorSpec],
        base: Mapping[str, np.ndarray] | None = None,
    ) -> Tensors:
        """Full float32 tensors in ``specs`` order (``base`` added back for delta).

        Raises :class:`CodecError` on any malformed payload; never returns partial data.
        """
        sizes = validate_specs(specs)
        total = sum(sizes)
        bases = base_flats(base, specs) if self.delta else None
        try:
            body: bytes | memoryview = memoryview(payload).cast("B")
            if self.zstd_level is not None:
                body = zstd_mod.zstd_decompress(body, self.max_payload_body(total))
            flat = raw_decode(body, total) if self.dense_raw else self._decode_lossy(body, sizes)
        except CodecError:
            raise
        except (ValueError, IndexError, OverflowError, TypeError) as exc:  # defensive
            raise CodecError(f"malformed payload: {exc}", reason=Reason.CORRUPT) from exc
        if bases is not None:
            offs = np.cumsum([0, *sizes])
            parts = [flat[offs[i] : offs[i + 1]] for i in range(len(sizes))]
            flat = np.concatenate(delta_decode(parts, bases)) if parts else flat
        return unflatten(specs, flat)

    def _decode_lossy(self, body: bytes | memoryview, sizes: Sequence[int]) -> Flat:
        rd = Reader(body)
        n_tensors = rd.varint("tensor count")
        if n_tensors != len(sizes):
            raise CodecError(f"payload has {n_tensors} tensors, specs {len(sizes)}", reason=Reason.TENSOR_COUNT)
        n_elems = rd.varint("element count")
        total = sum(sizes)
        if n_elems != total:
            raise CodecError(f"payload has {n_elems} elements, specs {total}", reason=Reason.SHAPE_MISMATCH)
        sections = self._sections(sizes)
        counts: list[int] = []
        indices: list[npt.NDArray[np.int64]] = []
        if self.topk is not None:
            heads: list[tuple[int, int]] = []
            for sec in sections:
                k = rd.varint("top-k count")
                expect = topk_count(sec.n, self.topk.fraction)
                if k != expect:
                    raise CodecError(f"top-k count {k}, spec implies {expect}", reason=Reason.BAD_COUNT)
                heads.append((k, rd.varint("index length")))
            for sec, (k, nbytes) in zip(sections, heads, strict=True):
                idx = decode_indices(rd.take(nbytes, "indices"), k, sec.n)
                indices.append(idx + sec.start)
                counts.append(k)
        else:
            counts = [sec.n for sec in sections]
        n_vals = sum(counts)
        if self.quant is not None:
            q = self.quant
            nblocks = [block_count(c, q.block) for c in counts]
            scales = np.frombuffer(rd.take(4 * sum(nblocks), "scales"), dtype=F32)
            codes = unpack_codes(rd.take(packed_size(n_vals, q.bits), "codes"), q.bits, n_vals)
            rd.finish()
            vals: list[Flat] = []
            s_off = c_off = 0
            for c, nb in zip(counts, nblocks, strict=True):
                vals.append(dequantize(scales[s_off : s_off + nb], codes[c_off : c_off + c], q.bits, q.block))
                s_off += nb
                c_off += c
            values = np.concatenate(vals) if vals else np.zeros(0, np.float32)
        else:
            values = np.frombuffer(rd.take(4 * n_vals, "values"), dtype=F32).astype(np.float32)
            rd.finish()
        if self.topk is None:
            return values
        out = np.zeros(total, dtype=np.float32)
        if indices:
            out[np.concatenate(indices)] = values
        return out
