"""The packed meta codec against SPEC 1.3, byte for byte."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from overlapd.kernels.meta import (
    FLAG_NORMAL,
    FLAG_SPECULATIVE,
    MetaError,
    decode_meta1,
    encode_meta1,
    pack_step,
    step_body_size,
    step_columns,
    unpack_step,
    write_step,
)


def spec_pack(step_id, flag, accept, rids, finish, tokens, logprobs, ranks) -> bytes:
    """SPEC 1.3 written out with struct, one field at a time: the independent reference."""
    bsz, T, k1 = tokens.shape
    k = k1 - 1
    out = bytearray()
    out += struct.pack("<3i", step_id, flag | (k << 8) | (T << 16), bsz)
    out += struct.pack(f"<{bsz}i", *accept)
    out += b"\0" * (-len(out) % 8)
    out += struct.pack(f"<{bsz}Q", *rids)
    out += struct.pack(f"<{bsz}i", *finish)
    for i in range(bsz):
        for t in range(T):
            for j in range(k1):
                out += struct.pack("<i", int(tokens[i, t, j]) if t < accept[i] else 0)
    if k > 0:
        for i in range(bsz):
            for t in range(T):
                for j in range(k1):
                    out += struct.pack("<f", float(logprobs[i, t, j]) if t < accept[i] else 0.0)
        for i in range(bsz):
            for t in range(T):
                out += struct.pack("<i", int(ranks[i, t]) if t < accept[i] else 0)
    out += b"\0" * (-len(out) % 8)
    return bytes(out)


def make_step(rng: np.random.Generator, bsz: int, T: int, k: int):
    accept = rng.integers(1, T + 1, size=bsz).astype(np.int32)
    rids = rng.integers(0, 2**63, size=bsz, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    finish = rng.integers(0, 6, size=bsz).astype(np.int32)
    tokens = rng.integers(0, 128256, size=(bsz, T, k + 1)).astype(np.int32)
    logprobs = ranks = None
    if k:
        logprobs = -rng.random((bsz, T, k + 1)).astype(np.float32) * 20
        ranks = rng.integers(1, 128256, size=(bsz, T)).astype(np.int32)
    return accept, rids, finish, tokens, logprobs, ranks


CASES = [
    # (bsz, T, k, step_id, flag)
    (1, 1, 0, 1, FLAG_NORMAL),
    (3, 1, 0, 7, FLAG_NORMAL),
    (5, 1, 20, 9, FLAG_NORMAL),
    (4, 4, 0, 11, FLAG_SPECULATIVE),
    (4, 4, 5, 12, FLAG_SPECULATIVE),
    (7, 3, 20, -13, FLAG_SPECULATIVE),  # negated: the producer's last record
    (0, 1, 0, 2, FLAG_NORMAL),
    (0, 2, 3, -2, FLAG_NORMAL),
    (1024, 1, 20, 99, FLAG_NORMAL),  # the largest batch the engine sizes for
    (256, 8, 1, 100, FLAG_SPECULATIVE),
]


@pytest.mark.parametrize("bsz,T,k,step_id,flag", CASES)
def test_pack_matches_spec_bytes_and_round_trips(bsz, T, k, step_id, flag):
    rng = np.random.default_rng(bsz * 1000 + T * 10 + k)
    accept, rids, finish, tokens, logprobs, ranks = make_step(rng, bsz, T, k)
    body = pack_step(
        step_id=step_id, flag=flag, request_id=rids, finish=finish, tokens=tokens,
        accept_num=accept, logprobs=logprobs, ranks=ranks,
    )
    assert body == spec_pack(step_id, flag, accept, rids, finish, tokens, logprobs, ranks)
    assert len(body) == step_body_size(bsz, T, k) and len(body) % 8 == 0

    view = unpack_step(body)
    assert (view.step_id, view.flag, view.k, view.T, view.bsz) == (step_id, flag, k, T, bsz)
    assert view.is_last == (step_id < 0)
    np.testing.assert_array_equal(view.accept_num, accept)
    np.testing.assert_array_equal(view.request_id, rids)
    np.testing.assert_array_equal(view.finish, finish)
    mask = np.arange(T)[None, :] < accept[:, None]
    np.testing.assert_array_equal(view.tokens, np.where(mask[:, :, None], tokens, 0))
    if k:
        np.testing.assert_array_equal(view.logprobs, np.where(mask[:, :, None], logprobs, 0))
        np.testing.assert_array_equal(view.ranks, np.where(mask, ranks, 0))
    else:
        assert view.logprobs is None and view.ranks is None


def test_views_share_the_body_and_are_read_only():
    body = pack_step(step_id=1, request_id=[5], finish=[0], tokens=[42])
    view = unpack_step(body)
    assert view.tokens.base is not None and not view.tokens.flags.writeable
    assert view.tokens.shape == (1, 1, 1) and int(view.tokens[0, 0, 0]) == 42


def test_write_step_zeroes_stale_bytes_in_place():
    cols = step_columns(step_id=3, request_id=[1, 2], finish=[0, 3], tokens=np.ones((2, 2, 1)), accept_num=[1, 2])
    buf = bytearray(b"\xff" * (cols.layout.size + 16))
    write_step(memoryview(buf), cols)
    assert bytes(buf[: cols.layout.size]) == pack_step(
        step_id=3, request_id=[1, 2], finish=[0, 3], tokens=np.ones((2, 2, 1)), accept_num=[1, 2]
    )
    assert buf[cols.layout.size :] == b"\xff" * 16  # nothing past the body is touched


def test_meta1_masks_the_high_byte_and_round_trips_every_field():
    assert decode_meta1(encode_meta1(2, 20, 7)) == (2, 20, 7)
    assert decode_meta1(encode_meta1(1, 255, 255)) == (1, 255, 255)
    assert decode_meta1(0x7F000000 | encode_meta1(1, 3, 1)) == (1, 3, 1)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(tokens=np.zeros((2, 1, 1)), request_id=[1], finish=[0, 0]), "request_id"),
        (dict(tokens=np.zeros((1, 2, 1)), request_id=[1], finish=[0], accept_num=[3]), "accept_num"),
        (dict(tokens=np.zeros((1, 2, 1)), request_id=[1], finish=[0], accept_num=[0]), "accept_num"),
        (dict(tokens=np.zeros((1, 1, 3)), request_id=[1], finish=[0]), "logprobs"),
        (dict(tokens=np.zeros((1, 1, 1)), request_id=[1], finish=[0], step_id=0), "step_id"),
        (dict(tokens=np.zeros((1, 1, 1)), request_id=[1], finish=[0], step_id=2**31), "step_id"),
        (dict(tokens=np.zeros((1, 300, 1)), request_id=[1], finish=[0]), "T"),
        (dict(tokens=np.zeros((1, 1, 257)), request_id=[1], finish=[0]), "k"),
        (dict(tokens=np.zeros((2, 2)), request_id=[1, 2], finish=[0, 0]), "tokens"),
    ],
)
def test_bad_columns_are_refused_by_name(kwargs, needle):
    kwargs.setdefault("step_id", 1)
    with pytest.raises(MetaError, match=needle):
        pack_step(**kwargs)


@pytest.mark.parametrize(
    "body,needle",
    [
        (b"", "shorter"),
        (struct.pack("<3i", 1, 1 | (1 << 16), -1), "bad STEP shape"),
        (struct.pack("<3i", 1, 1, 1) + b"\0" * 4, "bad STEP shape"),  # T = 0
        (struct.pack("<3i", 1, 1 | (1 << 16), 1 << 28), "does not fit"),
        (struct.pack("<3i", 1, 1 | (1 << 16) | (1 << 24), 0) + b"\0" * 4, "bits 24-31"),
        (pack_step(step_id=1, request_id=[1, 2], finish=[0, 0], tokens=[3, 4])[:-8], "needs"),
    ],
)
def test_malformed_bodies_raise_meta_error(body, needle):
    with pytest.raises(MetaError, match=needle):
        unpack_step(body)
