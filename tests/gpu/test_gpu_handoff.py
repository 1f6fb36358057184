"""The native handoff on a real stream: pinned pool, async copies, and the
eventfd host function that wakes the asyncio loop (kernels/cuda_handoff.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from gpu_support import requires_gpu

pytestmark = requires_gpu


@pytest.fixture(scope="module")
def handoff(torch):
    from overlapd.kernels import cuda_handoff

    if cuda_handoff.native() is None:
        pytest.fail("the _cuda extension is missing on a GPU host: build with OVERLAPD_CUDA=1")
    return cuda_handoff


def test_pinned_pool_is_bounded_and_copies_exactly(torch, handoff):
    pool = handoff.PinnedCopies(slot_bytes=4096, slots=2)
    stream = torch.cuda.current_stream().cuda_stream
    a = torch.randint(0, 1 << 62, (64, 8), device="cuda")
    b = torch.randn(1000, device="cuda")
    pa = pool.copy_async(a.data_ptr(), a.numel() * 8, np.int64, (64, 8), stream)
    pb = pool.copy_async(b.data_ptr(), b.numel() * 4, np.float32, (1000,), stream)
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.copy_async(b.data_ptr(), 4, np.float32, (1,), stream)
    assert np.array_equal(pa.result(), a.cpu().numpy()) and np.array_equal(pb.result(), b.cpu().numpy())
    assert pool.available == 2


def test_host_function_wakes_the_loop_after_the_copy_and_the_loop_stays_free(torch, handoff):
    from overlapd.kernels.handoff import CompletionQueue

    async def main() -> tuple[int, list[bool], list[bool]]:
        cq = CompletionQueue(asyncio.get_running_loop())
        pool = handoff.PinnedCopies(slot_bytes=1 << 16, slots=4)
        stream = torch.cuda.current_stream().cuda_stream
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.ensure_future(ticker())
        landed, correct = [], []
        for i in range(3):
            x = torch.full((4096,), float(i), device="cuda")
            torch.cuda._sleep(50_000_000)  # tens of ms of device work queued before the copy
            y = x * 2 + 1
            done = cq.wait()
            pending = pool.copy_async(y.data_ptr(), y.numel() * 4, np.float32, (4096,), stream)
            handoff.signal_after(stream, cq.fd)
            await done
            landed.append(pending.done())  # the copy had finished when the loop woke
            correct.append(bool((pending.result() == 2 * i + 1).all()))
        t.cancel()
        cq.close()
        return ticks, landed, correct

    ticks, landed, correct = asyncio.run(main())
    assert all(landed) and all(correct)
    assert ticks > 10  # the loop ran other work while the device was busy


@pytest.mark.parametrize("mode", ["hostfunc", "spin"])
def test_every_signal_arrives_in_order_and_only_after_its_work(torch, handoff, mode):
    from overlapd.kernels.handoff import CompletionQueue

    async def main() -> tuple[list[int], list[bool]]:
        cq = CompletionQueue(asyncio.get_running_loop())
        stream = torch.cuda.current_stream().cuda_stream
        spin = handoff.spin_waiter(cq.fd) if mode == "spin" else None
        order: list[int] = []
        futs, events, ready = [], [], []
        for i in range(300):
            if i % 50 == 0:
                torch.cuda._sleep(2_000_000)  # some signals wait behind real device work
            ev = torch.cuda.Event()
            ev.record()
            f = cq.wait()
            f.add_done_callback(lambda _f, i=i, ev=ev: (order.append(i), ready.append(ev.query())))
            futs.append(f)
            events.append(ev)
            if spin is not None:
                spin.watch(stream)
            else:
                handoff.signal_after(stream, cq.fd)
        await asyncio.wait_for(asyncio.gather(*futs), 10)
        del spin
        cq.close()
        return order, ready

    order, ready = asyncio.run(main())
    assert order == list(range(300)) and all(ready)
