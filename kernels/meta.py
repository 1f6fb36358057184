"""The packed meta format: one engine step's outputs as a STEP record body.

SPEC.md 1.3 is the authority. Packing writes numpy arrays straight into the
destination buffer (the ring's reserved bytes, usually) and unpacking returns
numpy views over the body: no per-token Python loops either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLAG_NORMAL = 1
FLAG_SPECULATIVE = 2
MAX_K = 255  # 8 bits in meta[1]; the socket API allows at most 20
MAX_T = 255


class MetaError(ValueError):
    """A STEP body that does not follow SPEC 1.3, or arguments that cannot be packed."""


def _align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True, slots=True)
class StepLayout:
    """Byte offsets of every column of a STEP body with the given shape."""

    bsz: int
    T: int
    k: int
    request_id: int
    finish: int
    tokens: int
    logprobs: int  # -1 when k == 0
    ranks: int  # -1 when k == 0
    size: int  # the whole body, padded to 8 bytes

    @classmethod
    def of(cls, bsz: int, T: int, k: int) -> StepLayout:
        if bsz < 0:
            raise MetaError(f"bsz must be >= 0, got {bsz}")
        if not 1 <= T <= MAX_T:
            raise MetaError(f"T (token columns per row) must be in 1..{MAX_T}, got {T}")
        if not 0 <= k <= MAX_K:
            raise MetaError(f"k (top-k logprobs) must be in 0..{MAX_K}, got {k}")
        request_id = _align8(4 * (3 + bsz))
        finish = request_id + 8 * bsz
        tokens = finish + 4 * bsz
        cells = bsz * T * (k + 1)
        end = tokens + 4 * cells
        logprobs = ranks = -1
        if k > 0:
            logprobs = end
            ranks = logprobs + 4 * cells
            end = ranks + 4 * bsz * T
        return cls(bsz, T, k, request_id, finish, tokens, logprobs, ranks, _align8(end))


def step_body_size(bsz: int, T: int = 1, k: int = 0) -> int:
    return StepLayout.of(bsz, T, k).size


def encode_meta1(flag: int, k: int, T: int) -> int:
    """meta[1]: bits 0-7 flag, 8-15 k, 16-23 T, 24-31 zero (as an i32 value)."""
    if not 0 <= flag <= 0xFF:
        raise MetaError(f"flag must fit 8 bits, got {flag}")
    return flag | (k << 8) | (T << 16)


def decode_meta1(word: int) -> tuple[int, int, int]:
    """(flag, k, T), masked as SPEC 1.3 tells readers to."""
    return word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF


@dataclass(frozen=True, slots=True)
class StepView:
    """A decoded STEP body. Arrays are read-only views into the body."""

    step_id: int
    flag: int
    k: int
    T: int
    accept_num: np.ndarray  # i32 [bsz]
    request_id: np.ndarray  # u64 [bsz]
    finish: np.ndarray  # i32 [bsz]
    tokens: np.ndarray  # i32 [bsz, T, k+1]
    logprobs: np.ndarray | None  # f32 [bsz, T, k+1]
    ranks: np.ndarray | None  # i32 [bsz, T]

    @property
    def bsz(self) -> int:
        return int(self.request_id.shape[0])

    @property
    def is_last(self) -> bool:
        """The producer's final record before it stopped (negated step id)."""
        return self.step_id < 0


def _column(buf: np.ndarray, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape)) if shape else 1
    return buf[offset : offset + count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)


@dataclass(frozen=True, slots=True)
class StepColumns:
    """A step's columns, checked and converted, ready to be written."""

    layout: StepLayout
    meta: np.ndarray  # i32 [3 + bsz]
    request_id: np.ndarray
    finish: np.ndarray
    tokens: np.ndarray
    valid: np.ndarray  # bool [bsz, T]: columns that carry data
    logprobs: np.ndarray | None
    ranks: np.ndarray | None


def step_columns(
    *,
    step_id: int,
    request_id: np.ndarray,
    finish: np.ndarray,
    tokens: np.ndarray,
    accept_num: np.ndarray | None = None,
    logprobs: np.ndarray | None = None,
    ranks: np.ndarray | None = None,
    flag: int = FLAG_NORMAL,
) -> StepColumns:
    """Check and convert a step's arrays; raises MetaError naming what is wrong.

    `tokens` is [bsz, T, k+1] (or [bsz] for T = 1, k = 0); `logprobs` the same
    shape as tokens when k > 0; `ranks` [bsz, T].
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    if tokens.ndim == 1:
        tokens = tokens.reshape(-1, 1, 1)
    if tokens.ndim != 3:
        raise MetaError(f"tokens must be [bsz, T, k+1], got shape {tokens.shape}")
    bsz, T, k1 = tokens.shape
    layout = StepLayout.of(bsz, T, k1 - 1)
    k = layout.k
    request_id = np.asarray(request_id, dtype=np.uint64)
    finish = np.asarray(finish, dtype=np.int32)
    if request_id.shape != (bsz,) or finish.shape != (bsz,):
        raise MetaError(f"request_id and finish must have shape ({bsz},)")
    if accept_num is None:
        accept_num = np.ones(bsz, dtype=np.int32)
    accept_num = np.asarray(accept_num, dtype=np.int32)
    if accept_num.shape != (bsz,) or (bsz and (accept_num.min() < 1 or accept_num.max() > T)):
        raise MetaError(f"accept_num must have shape ({bsz},) with values in 1..{T}")
    if (logprobs is None) != (k == 0) or (ranks is None) != (k == 0):
        raise MetaError("logprobs and ranks are required exactly when k > 0")
    if k > 0:
        logprobs = np.asarray(logprobs, dtype=np.float32)
        ranks = np.asarray(ranks, dtype=np.int32)
        if logprobs.shape != tokens.shape or ranks.shape != (bsz, T):
            raise MetaError(f"logprobs must be {tokens.shape} and ranks ({bsz}, {T})")
    if step_id == 0 or not -(2**31) < step_id < 2**31:
        raise MetaError(f"step_id must be a nonzero i32, got {step_id}")
    meta = np.empty(3 + bsz, dtype=np.int32)
    meta[0], meta[1], meta[2] = step_id, encode_meta1(flag, k, T), bsz
    meta[3:] = accept_num
    valid = np.arange(T, dtype=np.int32)[None, :] < accept_num[:, None]
    return StepColumns(layout, meta, request_id, finish, tokens, valid, logprobs, ranks)


def write_step(out: memoryview | bytearray | np.ndarray, cols: StepColumns) -> None:
    """Write checked columns into `out` (at least `cols.layout.size` bytes).

    Padding and the columns past each row's accept_num are written as zeros,
    as SPEC requires, whatever the buffer held before.
    """
    layout = cols.layout
    bsz, T, k = layout.bsz, layout.T, layout.k
    dst = out if isinstance(out, np.ndarray) else np.frombuffer(out, dtype=np.uint8)
    if dst.nbytes < layout.size:
        raise MetaError(f"buffer of {dst.nbytes} bytes is smaller than the body ({layout.size})")
    dst = dst[: layout.size]
    dst[:] = 0
    _column(dst, 0, "<i4", (3 + bsz,))[:] = cols.meta
    _column(dst, layout.request_id, "<u8", (bsz,))[:] = cols.request_id
    _column(dst, layout.finish, "<i4", (bsz,))[:] = cols.finish
    cell_mask = cols.valid[:, :, None]
    np.copyto(_column(dst, layout.tokens, "<i4", (bsz, T, k + 1)), cols.tokens, where=cell_mask)
    if k > 0:
        np.copyto(_column(dst, layout.logprobs, "<f4", (bsz, T, k + 1)), cols.logprobs, where=cell_mask)
        np.copyto(_column(dst, layout.ranks, "<i4", (bsz, T)), cols.ranks, where=cols.valid)


def pack_step(**columns: object) -> bytes:
    """A step's body as new bytes (the ring writer packs in place instead)."""
    cols = step_columns(**columns)  # type: ignore[arg-type]
    out = np.zeros(cols.layout.size, dtype=np.uint8)
    write_step(out, cols)
    return out.tobytes()


def unpack_step(body: bytes | memoryview | np.ndarray) -> StepView:
    """Decode a STEP body, checking every size against the body's length."""
    buf = np.frombuffer(body, dtype=np.uint8) if not isinstance(body, np.ndarray) else body
    if buf.nbytes < 12:
        raise MetaError(f"STEP body of {buf.nbytes} bytes is shorter than its 12-byte meta prefix")
    step_id, meta1, bsz = (int(x) for x in buf[:12].view("<i4"))
    flag, k, T = decode_meta1(meta1)
    if meta1 >> 24:
        raise MetaError(f"meta[1] bits 24-31 must be zero, got {meta1:#x}")
    if bsz < 0 or T < 1:
        raise MetaError(f"bad STEP shape: bsz={bsz} T={T}")
    if _align8(4 * (3 + bsz)) > buf.nbytes:
        raise MetaError(f"bsz={bsz} does not fit a body of {buf.nbytes} bytes")
    layout = StepLayout.of(bsz, T, k)
    if layout.size > buf.nbytes:
        raise MetaError(f"STEP body needs {layout.size} bytes for bsz={bsz} T={T} k={k}, has {buf.nbytes}")
    logprobs = ranks = None
    if k > 0:
        logprobs = _column(buf, layout.logprobs, "<f4", (bsz, T, k + 1))
        ranks = _column(buf, layout.ranks, "<i4", (bsz, T))
    return StepView(
        step_id=step_id,
        flag=flag,
        k=k,
        T=T,
        accept_num=_column(buf, 12, "<i4", (bsz,)),
        request_id=_column(buf, layout.request_id, "<u8", (bsz,)),
        finish=_column(buf, layout.finish, "<i4", (bsz,)),
        tokens=_column(buf, layout.tokens, "<i4", (bsz, T, k + 1)),
        logprobs=logprobs,
        ranks=ranks,
    )
