"""The completion queue: steps signalled from another thread wake the loop in launch order."""

from __future__ import annotations

import asyncio
import threading
import time

import uvloop

from overlapd.kernels.handoff import CompletionQueue


def test_signals_from_a_thread_resolve_waiters_in_order_without_polling():
    async def main() -> list[int]:
        q = CompletionQueue(asyncio.get_running_loop())
        order: list[int] = []

        futures = [q.wait() for _ in range(5)]  # taken in launch order, as the execute stage does

        async def waiter(i: int) -> None:
            await futures[i]
            order.append(i)

        tasks = [asyncio.create_task(waiter(i)) for i in reversed(range(5))]

        def device() -> None:
            for _ in range(5):
                time.sleep(0.01)
                q.signal()

        threading.Thread(target=device).start()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        q.close()
        return order

    assert uvloop.run(main()) == [0, 1, 2, 3, 4]


def test_completions_before_anyone_waits_are_kept():
    async def main() -> bool:
        q = CompletionQueue(asyncio.get_running_loop())
        q.signal()
        q.signal()
        await asyncio.sleep(0.01)  # the loop reads the eventfd: count 2, nobody waiting
        first, second, third = q.wait(), q.wait(), q.wait()
        ok = first.done() and second.done() and not third.done()
        q.signal()
        await asyncio.wait_for(third, 1)
        q.close()
        return ok

    assert uvloop.run(main())
