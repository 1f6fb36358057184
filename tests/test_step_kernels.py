"""The step kernels' ops fallbacks (what CPU builds run; the CUDA kernels are
compared against them in tests/gpu/test_gpu_step_kernels.py): the device's
stop verdict equals the host's `token_stop_reason`, seeds and uniforms are
unchanged, decode inputs come from the previous step."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from engine_test_support import get_ops, make_runner, tiny_cache, tiny_loaded  # noqa: F401
from overlapd.kernels import step_kernels
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.request import Request, device_stop_reason, token_stop_reason, token_stops
from overlapd.stages.runner.input_batch import BatchLimits, DeviceInputs, StagingBuffer
from overlapd.stages.runner.step_stager import StepStager
from overlapd.stages.sampling.sampler import SEED_INCREMENT, SEED_MODULUS, Sampler, seed_state, uniform_from_state
from overlapd.stages.scheduling import Scheduler
from overlapd.stages.step_types import (
    STOP_TABLE_WIDTH, FinishReason, SamplingParams, ScheduledRow, SchedulerOutput, TokenStops,
)

VOCAB = 40  # small, so sampled tokens hit stop ids often
LIM = BatchLimits(max_tokens=32, max_rows=8, max_blocks=2, block_size=4, num_blocks=16, max_model_len=8,
                  vocab_size=VOCAB)


# --- the host side: TokenStops and the device verdict's completion ----------------

def test_token_stops_put_eos_first_deduplicated_and_respect_ignore_eos() -> None:
    p = SamplingParams(max_tokens=9, stop_token_ids=(7, 3, 7, 5))
    s = token_stops(p, {5, 2}, num_prompt_tokens=4, max_model_len=10)
    assert s == TokenStops(ids=(2, 5, 7, 3), num_eos=2, max_outputs=6)
    s = token_stops(SamplingParams(max_tokens=3, stop_token_ids=(5,), ignore_eos=True), {5, 2}, 4, 10)
    assert s == TokenStops(ids=(5,), num_eos=0, max_outputs=3)
    many = tuple(range(100, 100 + STOP_TABLE_WIDTH + 3))
    s = token_stops(SamplingParams(stop_token_ids=many), (), 1, 100)
    assert s.table == many[:STOP_TABLE_WIDTH] and s.overflow == many[STOP_TABLE_WIDTH:]


def test_the_host_completes_the_device_verdict_only_with_overflow_ids() -> None:
    eos = set(range(STOP_TABLE_WIDTH + 2))  # more eos ids than the table holds
    s = token_stops(SamplingParams(stop_token_ids=(50, 1)), eos, 1, 100)
    assert s.overflow == (STOP_TABLE_WIDTH, STOP_TABLE_WIDTH + 1, 50)
    assert device_stop_reason(0, STOP_TABLE_WIDTH + 1, s) is FinishReason.EOS
    assert device_stop_reason(FinishReason.LENGTH, 50, s) is FinishReason.STOP  # an id outranks the length
    assert device_stop_reason(FinishReason.LENGTH, 99, s) is FinishReason.LENGTH
    assert device_stop_reason(FinishReason.EOS, 1, s) is FinishReason.EOS
    assert device_stop_reason(0, 99, s) is None


# --- the device side (ops fallback) through the real staging path -------------------

def _random_request(rng: random.Random, req_id: int, eos: set[int]) -> tuple[Request, int]:
    n_stop = rng.choice([0, 1, 3, STOP_TABLE_WIDTH - 1, STOP_TABLE_WIDTH + 2, 25])
    params = SamplingParams(max_tokens=rng.randint(1, 12), ignore_eos=rng.random() < 0.3,
                            stop_token_ids=tuple(rng.randrange(VOCAB) for _ in range(n_stop)))
    req = Request(req_id, [1] * rng.randint(1, 6), params, seed=req_id, arrival=req_id)
    max_model_len = rng.randint(2, 16)  # sometimes tighter than prompt + max_tokens
    req.stops = token_stops(params, eos, req.num_prompt_tokens, max_model_len)
    return req, max_model_len


def _row(req: Request, output_index: int, sample: bool) -> ScheduledRow:
    return ScheduledRow(req.req_id, [0], 0, False, sample, output_index, [0], req.params, req.seed, req.stops)


def _verdicts(inp: DeviceInputs, stager: StepStager, so: SchedulerOutput, tokens: list[int]) -> list[int]:
    ops = get_ops()
    buf = StagingBuffer(LIM)
    counts = stager.stage(so, buf)
    inp.load(buf, counts)
    r = len(so.rows)
    codes = inp.stops.finish_codes(ops.from_numpy(np.array(tokens, np.int64)), inp.row_slots[:r],
                                   inp.sample_mask[:r], inp.out_index[:r])
    return [int(c) for c in ops.to_numpy(codes)]


def _reference(req: Request, output_index: int, token: int, eos: set[int], max_model_len: int) -> FinishReason | None:
    probe = Request(req.req_id, req.prompt_token_ids, req.params, req.seed, 0)
    probe.output_token_ids = [0] * output_index + [token]
    return token_stop_reason(probe, token, eos, max_model_len)


@pytest.mark.parametrize("case", range(12))
def test_stop_flags_equal_token_stop_reason_on_random_requests(case: int) -> None:
    rng = random.Random(case)
    eos = set(rng.sample(range(VOCAB), rng.choice([0, 1, 3, STOP_TABLE_WIDTH + 4])))
    inp, stager = DeviceInputs(get_ops(), LIM, use_kernels=False), StepStager(LIM)
    live: dict[int, tuple[Request, int, int]] = {}  # req_id -> (request, max_model_len, next output_index)
    next_id, checked, reasons = 1, 0, set()
    for step in range(1, 13):
        # some leave (finished or preempted), newcomers and preempted ones (re)enter a slot
        freed = [rid for rid in list(live) if rng.random() < 0.3]
        readmit = [(live.pop(rid)) for rid in freed]
        while len(live) < LIM.max_rows and (readmit or rng.random() < 0.8):
            if readmit and rng.random() < 0.5:
                req, mml, k = readmit.pop()
            else:
                (req, mml), k = _random_request(rng, next_id, eos), rng.randint(0, 10)
                next_id += 1
            live[req.req_id] = (req, mml, k)
        rows, tokens = [], []
        for req, mml, k in live.values():
            sample = rng.random() < 0.85
            rows.append(_row(req, k, sample))
            tokens.append(rng.choice(sorted(req.stops.ids)) if req.stops.ids and rng.random() < 0.5
                          else rng.randrange(VOCAB))
        so = SchedulerOutput(step, rows, freed)
        codes = _verdicts(inp, stager, so, tokens)
        for row, token, code in zip(rows, tokens, codes):
            req, mml, k = live[row.req_id]
            if not row.sample:
                assert code == 0
                continue
            want = _reference(req, k, token, eos, mml)
            assert device_stop_reason(code, token, req.stops) == want, (req.params, req.stops, k, token, code)
            if token not in req.stops.overflow:
                assert code == int(want or 0)  # the device alone decided
            live[row.req_id] = (req, mml, k + 1)
            checked += 1
            reasons.add(want)
    assert checked > 40 and len(reasons) >= 3


def test_rows_without_stops_never_stop_on_the_device() -> None:
    inp, stager = DeviceInputs(get_ops(), LIM, use_kernels=False), StepStager(LIM)
    p = SamplingParams(max_tokens=1, stop_token_ids=(3,))
    rows = [ScheduledRow(1, [0], 0, False, True, 5, [0], p, 0)]  # made by hand: no TokenStops
    assert _verdicts(inp, stager, SchedulerOutput(1, rows), [3]) == [0]


# --- seeds, uniforms, decode inputs ------------------------------------------------

def test_build_gathers_the_states_before_advancing_only_rows_that_sample() -> None:
    ops = get_ops()
    inp = DeviceInputs(ops, LIM, use_kernels=False)
    s = inp.sampling
    states = np.array([seed_state(11 * i + 3, i) for i in range(LIM.max_rows)], np.int64)
    ops.copy_from_host_(s.seed_state, states)
    slots, mask = np.array([5, 0, 3], np.int64), np.array([1, 0, 1], np.int64)
    plain = ops.from_numpy(np.full(3, -1, np.int64))
    params = s.build(ops.from_numpy(slots), ops.from_numpy(mask), plain, advance=True)
    np.testing.assert_array_equal(ops.to_numpy(params.seed_state), states[slots])
    assert params.uniform is None  # the sampler hashes on the ops path
    u = ops.to_numpy(Sampler(ops, 8).uniforms(params.seed_state))
    np.testing.assert_array_equal(u, uniform_from_state(states[slots]))
    want = states.copy()
    want[[5, 3]] = (states[[5, 3]] + SEED_INCREMENT) % SEED_MODULUS
    want = np.append(want, 0)  # the spare slot of padding rows, untouched
    assert inp.pad_slot == LIM.max_rows
    np.testing.assert_array_equal(ops.to_numpy(s.seed_state), want)
    s.build(ops.from_numpy(slots), ops.from_numpy(mask), plain, advance=False)
    np.testing.assert_array_equal(ops.to_numpy(s.seed_state), want)


def test_verify_columns_sample_further_on_and_their_slot_moves_by_the_tokens_emitted() -> None:
    """A verify row's column j draws with its slot's state j outputs on (the state
    plain decoding would have there); after the step the slot moves on by the
    row's emitted tokens (its leading columns that drew their drafts, + 1) and
    keeps the columns it did not emit as its lag, by which the row chained on
    it moves back before the next step runs."""
    ops = get_ops()
    inp = DeviceInputs(ops, dataclasses.replace(LIM, verify_columns=4), use_kernels=False)
    s = inp.sampling
    states = np.array([seed_state(7 * i + 1, 3 * i) for i in range(LIM.max_rows)], np.int64)
    ops.copy_from_host_(s.seed_state, states)
    # a plain row (slot 5), a verify row of four columns (slot 2), one of two (slot 6), a prefill chunk (slot 0)
    slots = np.array([5, 2, 2, 2, 2, 6, 6, 0], np.int64)
    column = np.array([-1, 0, 1, 2, 3, 0, 1, -1], np.int64)
    mask = np.array([1, 1, 1, 1, 1, 1, 1, 0], np.int64)
    drew = np.array([0, 1, 1, 0, 1, 1, 0, 0], np.int64)  # slot 2: 2 drafts kept + 1; slot 6: 1 + 1
    t = ops.from_numpy
    params = s.build(t(slots), t(mask), t(column), advance=True)
    moved = lambda state, n: (state + n * SEED_INCREMENT) % SEED_MODULUS  # noqa: E731
    np.testing.assert_array_equal(ops.to_numpy(params.seed_state), moved(states[slots], np.maximum(column, 0)))
    after_build = states.copy()
    after_build[5] = moved(states[5], 1)  # plain rows move at once; verify rows wait for their counts
    np.testing.assert_array_equal(ops.to_numpy(s.seed_state)[: LIM.max_rows], after_build)
    ops.copy_from_host_(inp.row_slots, slots)
    ops.copy_from_host_(inp.column, column)
    inp.settle_verified_(len(slots), t(drew), advance=True)
    want = after_build.copy()
    want[2], want[6] = moved(states[2], 3), moved(states[6], 2)
    np.testing.assert_array_equal(ops.to_numpy(s.seed_state)[: LIM.max_rows], want)
    lag = ops.to_numpy(inp.lag)
    assert (lag[2], lag[6]) == (1, 0)  # slot 2 emitted 3 of its 4 columns, slot 6 both of its 2

    # the next step: rows chained on slot 2's and slot 6's verify rows, staged as if both kept every draft
    for name, values in (("row_slots", [2, 6]), ("lagged", [1, 1]), ("start_pos", [10, 20]), ("seq_lens", [11, 21]),
                         ("out_index", [5, 7]), ("query_start_loc", [0, 1, 2]), ("prev_rows", [4, 6])):
        ops.copy_from_host_(getattr(inp, name), np.array(values, np.int64))
    inp.apply_lag(2)
    got = {name: ops.to_numpy(getattr(inp, name))[:2].tolist()
           for name in ("start_pos", "seq_lens", "out_index", "prev_rows")}
    # slot 2's row moves back one position and takes the token of the column before the last
    assert got == {"start_pos": [9, 20], "seq_lens": [10, 21], "out_index": [4, 7], "prev_rows": [3, 6]}, got


def test_decode_inputs_come_from_the_previous_step() -> None:
    ops = get_ops()
    inp = DeviceInputs(ops, LIM, use_kernels=False)
    ops.copy_from_host_(inp.prev_sampled, np.array([30, 31, 32, 33], np.int64))
    ops.copy_from_host_(inp.input_ids, np.array([7, 0, 8, 0, 9], np.int64))
    ops.copy_from_host_(inp.prev_rows, np.array([-1, 2, -1, 0, -1], np.int64))
    inp.update_input_ids(5)
    np.testing.assert_array_equal(ops.to_numpy(inp.input_ids)[:5], [7, 32, 8, 30, 9])


def test_the_kernel_faces_decline_cpu_tensors() -> None:
    ops = get_ops()
    x = ops.zeros([2], "int64")
    assert not step_kernels.available(ops)
    assert step_kernels.update_input_ids(ops, x, x, x) is False
    assert step_kernels.stop_flags(ops, x, x, x, x, ops.zeros([2, 4], "int64"), x, x, x) is False
    f = ops.zeros([2], "float32")
    assert step_kernels.build_sampling_params(ops, f, f, x, x, x, x, x, f, f, x, x, f, advance=True) is False
    assert step_kernels.settle_verified_rows(ops, x, x, x, x, x, advance=True) is False
    assert step_kernels.apply_lag(ops, x, x, x, x, x, x, x, x) is False


# --- end to end: the real scheduler consumes the runner's verdict --------------------

def _drive(runner, sched: Scheduler, check: bool) -> tuple[dict[int, list[int]], dict[int, FinishReason], int]:
    """Sync steps until done; with `check`, every sampled row's device verdict is
    compared with token_stop_reason before update() applies it."""
    tokens: dict[int, list[int]] = {}
    finish: dict[int, FinishReason] = {}
    overflow_decided = 0
    for _ in range(500):  # a wrong verdict could leave a request that never ends
        if not sched.has_work():
            break
        so = sched.schedule()
        if so.is_empty:
            continue
        out = runner.execute(so)
        assert out.finish is not None and out.finish.shape == (len(so.rows),)
        for i, row in enumerate(so.rows):
            req = sched.get_request(row.req_id)
            if not row.sample:
                assert out.finish[i] == 0
            elif check and not req.is_finished:
                token = int(out.sampled[i])
                probe = Request(req.req_id, req.prompt_token_ids, req.params, req.seed, 0)
                probe.output_token_ids = [*req.output_token_ids, token]
                want = token_stop_reason(probe, token, sched.eos_token_ids, sched.max_model_len)
                assert device_stop_reason(int(out.finish[i]), token, row.stops) == want
                overflow_decided += token in row.stops.overflow and want is not None
        for t in sched.update(so, out):
            tokens.setdefault(t.req_id, []).append(t.token_id)
            if t.finish_reason is not None:
                finish[t.req_id] = t.finish_reason
    assert not sched.has_work(), "the requests did not finish"
    return tokens, finish, overflow_decided


@pytest.mark.parametrize("num_blocks", [128, 10])  # 10 blocks of 4: requests are preempted and re-enter
def test_the_scheduler_takes_the_runners_stop_verdict(tiny_loaded, num_blocks: int) -> None:
    cfg = EngineConfig(model="tiny", max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=4)
    prompts = [[0, 424, 13, 314, 338, 15, 370], [0, 7, 9], [0, 11, 5, 3, 2], [0, 99, 98], [0, 50, 51, 52]]
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def scheduler(eos: set[int], params: list[SamplingParams]) -> Scheduler:
        s = Scheduler(cfg, num_blocks=num_blocks, max_model_len=cfg.max_model_len,
                      vocab_size=tiny_loaded.config.vocab_size, eos_token_ids=eos)
        for i, (p, sp) in enumerate(zip(prompts, params)):
            s.add_request(i + 1, p, sp)
        return s

    free_run, _, _ = _drive(make_runner(tiny_loaded, num_blocks), scheduler(set(), [free] * 5), check=False)
    seen = {t for ts in free_run.values() for t in ts}
    fillers = [t for t in range(1, tiny_loaded.config.vocab_size) if t not in seen][:STOP_TABLE_WIDTH + 8]
    eos = {free_run[1][6], *fillers[:STOP_TABLE_WIDTH + 2]}  # more eos ids than the table holds
    params = [
        SamplingParams(temperature=0.0, max_tokens=12),  # ends on eos (maybe an overflowing one)
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                       stop_token_ids=(*fillers[:STOP_TABLE_WIDTH + 1], free_run[2][4])),  # the stop id overflows
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=(free_run[3][3],)),
        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),  # length
        SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(free_run[5][2],)),  # eos overflows
    ]
    sched = scheduler(eos, params)
    tokens, finish, overflow_decided = _drive(make_runner(tiny_loaded, num_blocks), sched, check=True)
    for rid, p in enumerate(params, start=1):  # the host-only rule on the free run's tokens
        want = free_run[rid][: len(tokens[rid])]
        assert tokens[rid] == want
        last = want[-1]
        if not p.ignore_eos and last in eos:
            assert finish[rid] is FinishReason.EOS
        elif last in p.stop_token_ids:
            assert finish[rid] is FinishReason.STOP
        else:
            assert finish[rid] is FinishReason.LENGTH and len(want) == p.max_tokens
    assert [finish[i] for i in (2, 3, 4)] == [FinishReason.STOP, FinishReason.STOP, FinishReason.LENGTH]
    assert overflow_decided >= 1
    if num_blocks == 10:
        assert sched.num_preemptions > 0
