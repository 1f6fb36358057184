"""The CUDA step kernels (kernels/src/step_kernels.cu) against their ops
fallbacks on the same inputs: bit-exact for the ints and the uniforms, also
inside a captured CUDA graph and through the real runner and scheduler."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_support import requires_gpu

pytestmark = requires_gpu

ROWS = 700  # several thread blocks of 128
SLOTS = 1000

# TorchOps captures every graph into one memory pool; once no graph of it is
# alive torch frees the pool, and a later capture into the same handle fails
# an allocator assertion. The module's runners and graphs share one ops, so
# they stay alive until the module ends.
_KEEP: list[object] = []


@pytest.fixture(scope="module")
def ops(torch):
    from overlapd.kernels import step_kernels
    from overlapd.stages.runtime.torch_ops import TorchOps

    ops = TorchOps("gpu")
    if not step_kernels.available(ops):
        pytest.fail("the _cuda extension (with the step kernels) is missing on a GPU host: build with OVERLAPD_CUDA=1")
    return ops


def _limits(max_tokens: int = 64, max_rows: int = 8):
    from overlapd.stages.runner.input_batch import BatchLimits

    return BatchLimits(max_tokens=max_tokens, max_rows=max_rows, max_blocks=4, block_size=4, num_blocks=64,
                       max_model_len=16, vocab_size=1000)


def _same(a: np.ndarray, b: np.ndarray) -> None:
    """Bit-exact, floats included."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


# --- build_sampling_params -------------------------------------------------------

def _sampling_pair(ops, rng: np.random.Generator):
    from overlapd.stages.sampling.sampler import PersistentSamplingParams

    kernel, fallback = (PersistentSamplingParams(ops, SLOTS, use_kernels=k) for k in (True, False))
    states = rng.integers(0, 1 << 31, SLOTS, dtype=np.int64)
    states[:3] = [0, 1, (1 << 31) - 1]
    values = (
        np.where(rng.random(SLOTS) < 0.3, 0, rng.uniform(0.05, 2, SLOTS)).astype(np.float32),
        rng.uniform(0.01, 1, SLOTS).astype(np.float32),
        np.where(rng.random(SLOTS) < 0.1, 1 << 62, rng.integers(0, 100, SLOTS)).astype(np.int64),
        states,
    )
    for p in (kernel, fallback):
        for dst, src in zip((p.temperature, p.top_p, p.top_k, p.seed_state), values):
            ops.copy_from_host_(dst, src)
    return kernel, fallback, states


def _step_rows(rng: np.random.Generator, columns: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(row_slots, column) of ROWS step rows as the stager lays them out: plain
    rows (column -1) and verify rows of 1..columns token columns (0, 1, ...) that
    share their slot; every scheduled row has a slot of its own."""
    slots, column = [], []
    free = iter(rng.permutation(SLOTS))
    while len(slots) < ROWS:
        slot = int(next(free))
        if rng.random() < 0.4:
            slots.append(slot)
            column.append(-1)
        else:
            n = min(int(rng.integers(1, columns + 1)), ROWS - len(slots))
            slots += [slot] * n
            column += list(range(n))
    return np.array(slots, np.int64), np.array(column, np.int64)


@pytest.mark.parametrize("advance", [True, False])
def test_build_sampling_params_equals_the_ops_path(torch, ops, advance: bool) -> None:
    from overlapd.stages.sampling.sampler import SEED_INCREMENT, SEED_MODULUS, Sampler, uniform_from_state

    rng = np.random.default_rng(1)
    kernel, fallback, states = _sampling_pair(ops, rng)
    slots, column = _step_rows(rng)
    mask = np.where(column >= 0, 1, rng.random(ROWS) < 0.8).astype(np.int64)
    t = ops.from_numpy
    pk = kernel.build(t(slots), t(mask), t(column), advance=advance)
    pf = fallback.build(t(slots), t(mask), t(column), advance=advance)
    for name in ("temperature", "top_p", "top_k", "seed_state"):
        _same(ops.to_numpy(getattr(pk, name)), ops.to_numpy(getattr(pf, name)))
    # the state before the advance, a verify column's moved on by its column
    own = (states[slots] + np.maximum(column, 0) * SEED_INCREMENT) % SEED_MODULUS
    _same(ops.to_numpy(pk.seed_state), own)
    u = ops.to_numpy(pk.uniform)
    _same(u, ops.to_numpy(Sampler(ops, 8).uniforms(pf.seed_state)))
    _same(u, uniform_from_state(own))
    after = ops.to_numpy(kernel.seed_state)
    _same(after, ops.to_numpy(fallback.seed_state))
    want = states.copy()
    if advance:  # plain rows that sample; verify rows move once their accept counts exist
        moved = slots[(mask > 0) & (column < 0)]
        want[moved] = (states[moved] + SEED_INCREMENT) % SEED_MODULUS
    _same(after, want)


def _inputs_pair(ops):
    """DeviceInputs with the CUDA kernels and with the ops path: SLOTS slots,
    room for ROWS step rows of up to 3 tokens, verify rows of up to 5 columns."""
    from overlapd.stages.runner.input_batch import BatchLimits, DeviceInputs

    lim = BatchLimits(max_tokens=3 * ROWS, max_rows=SLOTS, max_blocks=4, block_size=4, num_blocks=64,
                      max_model_len=16, vocab_size=1000, verify_columns=5)
    return DeviceInputs(ops, lim, use_kernels=True), DeviceInputs(ops, lim, use_kernels=False)


@pytest.mark.parametrize("advance", [True, False])
def test_settle_verified_rows_equals_the_ops_path(torch, ops, advance: bool) -> None:
    from overlapd.stages.sampling.sampler import SEED_INCREMENT, SEED_MODULUS

    rng = np.random.default_rng(3)
    slots, column = _step_rows(rng)
    drew = (rng.random(ROWS) < 0.7).astype(np.int64)
    states = rng.integers(0, 1 << 31, SLOTS + 1, dtype=np.int64)
    lags = rng.integers(0, 5, SLOTS + 1, dtype=np.int64)
    pair = _inputs_pair(ops)
    for x in pair:
        ops.copy_from_host_(x.sampling.seed_state, states)
        ops.copy_from_host_(x.lag, lags)
        ops.copy_from_host_(x.row_slots, slots)
        ops.copy_from_host_(x.column, column)
        x.settle_verified_(ROWS, ops.from_numpy(drew), advance=advance)
    want_states, want_lags = states.copy(), lags.copy()
    for r in np.flatnonzero(column == 0):
        width = 1
        while r + width < ROWS and column[r + width] == width:
            width += 1
        n = 1
        while n < width and drew[r + n - 1]:
            n += 1
        if advance:
            want_states[slots[r]] = (states[slots[r]] + n * SEED_INCREMENT) % SEED_MODULUS
        want_lags[slots[r]] = width - n
    for x in pair:
        _same(ops.to_numpy(x.sampling.seed_state), want_states)
        _same(ops.to_numpy(x.lag), want_lags)


def test_apply_lag_equals_the_ops_path(torch, ops) -> None:
    rng = np.random.default_rng(4)
    slots = rng.permutation(SLOTS)[:ROWS].astype(np.int64)
    qlens = rng.integers(1, 4, ROWS)
    qsl = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int64)
    tokens = int(qsl[-1])
    arrays = {
        "row_slots": slots, "query_start_loc": qsl,
        "lagged": (rng.random(ROWS) < 0.5).astype(np.int64),
        "start_pos": rng.integers(10, 100, ROWS, dtype=np.int64),
        "out_index": rng.integers(10, 100, ROWS, dtype=np.int64),
        "prev_rows": np.where(rng.random(tokens) < 0.6, rng.integers(5, 50, tokens), -1).astype(np.int64),
    }
    arrays["seq_lens"] = arrays["start_pos"] + qlens
    lags = rng.integers(0, 5, SLOTS + 1, dtype=np.int64)
    pair = _inputs_pair(ops)
    for x in pair:
        for name, a in arrays.items():
            ops.copy_from_host_(getattr(x, name), a)
        ops.copy_from_host_(x.lag, lags)
        x.apply_lag(ROWS)
    back = lags[slots] * arrays["lagged"]
    want = {name: arrays[name] - back for name in ("start_pos", "seq_lens", "out_index")}
    prev = arrays["prev_rows"].copy()
    first = qsl[:-1]
    prev[first] = np.where(prev[first] >= 0, prev[first] - back, prev[first])
    want["prev_rows"] = prev
    for x in pair:
        for name, a in want.items():
            _same(ops.to_numpy(getattr(x, name))[: len(a)], a)


def test_sampling_with_the_kernels_uniforms_gives_the_same_tokens(torch, ops) -> None:
    from overlapd.stages.sampling.sampler import Sampler

    rng = np.random.default_rng(2)
    kernel, fallback, _ = _sampling_pair(ops, rng)
    slots = ops.from_numpy(rng.permutation(SLOTS)[:ROWS].astype(np.int64))
    mask = ops.from_numpy(np.ones(ROWS, np.int64))
    logits = ops.from_numpy(rng.normal(0, 3, (ROWS, 256)).astype(np.float32))
    sampler = Sampler(ops, 256)
    plain = ops.from_numpy(np.full(ROWS, -1, np.int64))
    got = sampler.sample(logits, kernel.build(slots, mask, plain, advance=True), any_random=True)
    want = sampler.sample(logits, fallback.build(slots, mask, plain, advance=True), any_random=True)
    _same(ops.to_numpy(got), ops.to_numpy(want))


# --- update_input_ids ----------------------------------------------------------------

def test_update_input_ids_equals_the_ops_path(torch, ops) -> None:
    from overlapd.stages.runner.input_batch import DeviceInputs

    rng = np.random.default_rng(3)
    lim = _limits(max_tokens=600, max_rows=64)
    t = 517
    ids = rng.integers(0, 1000, lim.max_tokens, dtype=np.int64)
    prev_rows = np.where(rng.random(lim.max_tokens) < 0.4, rng.integers(0, 64, lim.max_tokens), -1).astype(np.int64)
    prev_sampled = rng.integers(0, 1000, 64, dtype=np.int64)
    got = []
    for use in (True, False):
        inp = DeviceInputs(ops, lim, use_kernels=use)
        ops.copy_from_host_(inp.input_ids, ids)
        ops.copy_from_host_(inp.prev_rows, prev_rows)
        ops.copy_from_host_(inp.prev_sampled, prev_sampled)
        inp.update_input_ids(t)
        got.append(ops.to_numpy(inp.input_ids))
    _same(got[0], got[1])
    want = ids.copy()
    take = prev_rows[:t] >= 0
    want[:t][take] = prev_sampled[prev_rows[:t][take]]
    _same(got[0], want)


# --- stop flags ------------------------------------------------------------------------

def _stop_case(ops, seed: int, use_kernels: bool):
    from overlapd.stages.runner.stop_flags import NO_LIMIT, PersistentStopFlags
    from overlapd.stages.step_types import STOP_TABLE_WIDTH

    rng = np.random.default_rng(seed)
    w = STOP_TABLE_WIDTH
    n = rng.integers(0, w + 1, SLOTS)
    table = np.where(np.arange(w)[None, :] < n[:, None], rng.integers(0, 50, (SLOTS, w)), -1).astype(np.int64)
    num_eos = np.minimum(rng.integers(0, w + 1, SLOTS), n).astype(np.int64)
    max_outputs = np.where(rng.random(SLOTS) < 0.1, NO_LIMIT, rng.integers(-2, 20, SLOTS)).astype(np.int64)
    flags = PersistentStopFlags(ops, SLOTS, w, use_kernels=use_kernels)
    ops.copy_from_host_(flags.stop_ids, table)
    ops.copy_from_host_(flags.num_eos, num_eos)
    ops.copy_from_host_(flags.max_outputs, max_outputs)
    slots = rng.integers(0, SLOTS, ROWS).astype(np.int64)  # the verdict allows repeated slots too
    sampled = rng.integers(0, 50, ROWS).astype(np.int64)
    out_index = rng.integers(0, 25, ROWS).astype(np.int64)
    mask = (rng.random(ROWS) < 0.8).astype(np.int64)
    host = (table, num_eos, max_outputs, slots, sampled, out_index, mask)
    return flags, host


def _stop_reference(table, num_eos, max_outputs, slots, sampled, out_index, mask) -> np.ndarray:
    out = np.zeros(len(slots), np.int64)
    for r, s in enumerate(slots):
        if mask[r] <= 0:
            continue
        hits = np.flatnonzero(table[s] == sampled[r])
        if len(hits):
            out[r] = 1 if hits[0] < num_eos[s] else 2
        elif out_index[r] + 1 >= max_outputs[s]:
            out[r] = 3
    return out


def test_stop_flags_equal_the_ops_path_and_the_reference(torch, ops) -> None:
    codes = []
    for use in (True, False):
        flags, host = _stop_case(ops, 4, use)
        _, _, _, slots, sampled, out_index, mask = host
        codes.append(ops.to_numpy(flags.finish_codes(*(ops.from_numpy(a) for a in (sampled, slots, mask, out_index)))))
    _same(codes[0], codes[1])
    _same(codes[0], _stop_reference(*host))
    assert set(np.unique(codes[0])) == {0, 1, 2, 3}


# --- capture -------------------------------------------------------------------------------

def test_kernels_captured_in_a_graph_follow_new_inputs_on_replay(torch, ops) -> None:
    from overlapd.stages.runner.input_batch import DeviceInputs

    lim = _limits(max_tokens=64, max_rows=8)
    inp = DeviceInputs(ops, lim, use_kernels=True)
    ref = DeviceInputs(ops, lim, use_kernels=False)
    def fill(x: DeviceInputs, seed: int) -> None:
        g = np.random.default_rng(seed)
        ops.copy_from_host_(x.prev_sampled, g.integers(0, 1000, 8, dtype=np.int64))
        ops.copy_from_host_(x.input_ids, g.integers(0, 1000, 64, dtype=np.int64))
        ops.copy_from_host_(x.prev_rows, np.where(g.random(64) < 0.5, g.integers(0, 8, 64), -1).astype(np.int64))
        ops.copy_from_host_(x.row_slots, g.permutation(8).astype(np.int64))
        ops.copy_from_host_(x.sample_mask, (g.random(8) < 0.7).astype(np.int64))
        ops.copy_from_host_(x.column, np.full(8, -1, np.int64))
        ops.copy_from_host_(x.out_index, g.integers(0, 8, 8, dtype=np.int64))
        ops.copy_from_host_(x.sampling.seed_state, g.integers(0, 1 << 31, 8, dtype=np.int64))
        ops.copy_from_host_(x.stops.stop_ids, g.integers(0, 20, (8, x.stops.width), dtype=np.int64))
        ops.copy_from_host_(x.stops.num_eos, g.integers(0, 4, 8, dtype=np.int64))
        ops.copy_from_host_(x.stops.max_outputs, g.integers(1, 8, 8, dtype=np.int64))

    sampled = ops.from_numpy(np.random.default_rng(5).integers(0, 20, 8, dtype=np.int64))

    def body(x: DeviceInputs):
        x.update_input_ids(40)
        p = x.sampling.build(x.row_slots, x.sample_mask, x.column, advance=False)
        codes = x.stops.finish_codes(sampled, x.row_slots, x.sample_mask, x.out_index)
        return p.seed_state, x.input_ids, codes

    fill(inp, 0)
    graph = ops.capture_graph(lambda: body(inp))
    _KEEP.append(graph)
    for seed in (1, 2):
        fill(inp, seed)
        fill(ref, seed)
        graph.replay()
        want = body(ref)
        for got_t, want_t in zip(graph.output, want):
            _same(ops.to_numpy(got_t), ops.to_numpy(want_t))


# --- through the real runner and scheduler -----------------------------------------------

def _drive(runner, sched, overlap: bool):
    """Steps (scheduled like LLMEngine's sync and overlap loops) until done; checks
    every sampled row's device verdict against token_stop_reason; returns each
    step's (sampled, finish) and the accepted tokens and finish reasons."""
    from overlapd.stages.request import Request, device_stop_reason, token_stop_reason

    log, tokens, finish = [], {}, {}
    in_flight = None

    def apply(so, out) -> None:
        assert out.finish is not None
        log.append((so.step_id, out.sampled.tolist(), out.finish.tolist()))
        for i, row in enumerate(so.rows):
            req = sched.get_request(row.req_id)
            if row.sample and req is not None and not req.is_finished:
                token = int(out.sampled[i])
                probe = Request(req.req_id, req.prompt_token_ids, req.params, req.seed, 0)
                probe.output_token_ids = [*req.output_token_ids, token]
                want = token_stop_reason(probe, token, sched.eos_token_ids, sched.max_model_len)
                assert device_stop_reason(int(out.finish[i]), token, row.stops) == want
        for t in sched.update(so, out):
            tokens.setdefault(t.req_id, []).append(t.token_id)
            if t.finish_reason is not None:
                finish[t.req_id] = t.finish_reason

    for _ in range(2000):
        if not sched.has_work() and in_flight is None:
            break
        so = sched.schedule()
        launched = (so, runner.launch(runner.prepare(so))) if not so.is_empty else None
        if not overlap:
            if launched is not None:
                apply(so, runner.collect(launched[1]))
            continue
        if in_flight is not None:
            apply(in_flight[0], runner.collect(in_flight[1]))
        in_flight = launched
    assert not sched.has_work() and in_flight is None
    return log, tokens, finish


@pytest.mark.parametrize("overlap", [False, True])
def test_runner_with_kernels_gives_the_ops_paths_tokens_and_stop_verdicts(torch, ops, overlap: bool) -> None:
    from engine_test_support import engine_config
    from overlapd.stages.model.loader import load_model
    from overlapd.stages.runner.model_runner import ModelRunner
    from overlapd.stages.scheduling import Scheduler
    from overlapd.stages.step_types import STOP_TABLE_WIDTH, FinishReason, SamplingParams

    cfg = engine_config(runtime="torch", device="gpu")
    loaded = load_model(cfg, ops)
    prompts = [[0, 424, 13, 314, 338, 15, 370], [0, 7, 9], [0, 11, 5, 3, 2], [0, 99, 98], [0, 50, 51, 52]]
    vocab = loaded.config.vocab_size

    def run(use_kernels: bool, eos: set[int], params: list[SamplingParams], num_blocks: int = 128):
        runner = ModelRunner(loaded, ops, cfg, num_blocks, use_kernels=use_kernels)
        _KEEP.append(runner)
        sched = Scheduler(cfg, num_blocks=num_blocks, max_model_len=cfg.max_model_len, vocab_size=vocab,
                          eos_token_ids=eos)
        for i, (p, sp) in enumerate(zip(prompts, params)):
            sched.add_request(i + 1, p, sp)
        return (*_drive(runner, sched, overlap), runner, sched)

    free = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)] * 5
    _, free_run, *_ = run(False, set(), free)
    seen = {t for ts in free_run.values() for t in ts}
    fillers = [t for t in range(1, vocab) if t not in seen][:STOP_TABLE_WIDTH + 8]
    eos = {free_run[1][6], *fillers[:STOP_TABLE_WIDTH + 2]}
    params = [
        SamplingParams(temperature=0.0, max_tokens=12),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                       stop_token_ids=(*fillers[:STOP_TABLE_WIDTH + 1], free_run[2][4])),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=(free_run[3][3],)),
        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
        # seeded sampling (eager steps); short, so the later greedy steps replay graphs
        SamplingParams(temperature=0.9, top_k=50, seed=77, max_tokens=4, stop_token_ids=(free_run[5][2],)),
    ]
    klog, ktok, kfin, krunner, _ = run(True, eos, params)
    flog, ftok, ffin, _, _ = run(False, eos, params)
    assert klog == flog and ktok == ftok and kfin == ffin
    assert kfin[2] is FinishReason.STOP and kfin[4] is FinishReason.LENGTH
    assert krunner.graphs is not None and krunner.graphs.replays > 0  # the kernels ran inside graphs too
    # preemption (10 blocks of 4): requests re-enter slots with their output index
    kpre, fpre = run(True, eos, params, num_blocks=10), run(False, eos, params, num_blocks=10)
    assert kpre[:3] == fpre[:3]
    assert kpre[4].num_preemptions > 0
