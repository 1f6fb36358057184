"""The HTTP request sink: the emit stage never waits for a client, and a client too far behind is cut off."""

from __future__ import annotations

import asyncio

from overlapd.daemon.http.metrics import HttpMetrics
from overlapd.daemon.http.sink import Failed, Finished, HttpSink


def metrics() -> HttpMetrics:
    return HttpMetrics(lambda: {}, live=lambda: 0)


def test_pieces_pile_up_without_waiting_and_come_out_in_order():
    async def run() -> None:
        sink = HttpSink(8, metrics())
        for i in range(3):
            sink.on_tokens([i], str(i), None)
        sink.on_done("length", 4, 3)
        sink.on_tokens([9], "late", None)  # after the end: ignored
        assert [p.text for p in await sink.next_pieces()] == ["0", "1", "2"]
        assert await sink.next_pieces() == []
        assert sink.end == Finished("length", 4, 3) and sink.engine_ended

    asyncio.run(run())


def test_a_reader_too_far_behind_ends_the_sink_so_the_handler_aborts_it():
    async def run() -> None:
        m = metrics()
        sink = HttpSink(2, m)
        for i in range(5):
            sink.on_tokens([i], "x", None)
        assert isinstance(sink.end, Failed) and sink.end.code == "overloaded"
        assert not sink.engine_ended  # the engine still runs it: the handler must abort it
        assert len(await sink.next_pieces()) == 2 and await sink.next_pieces() == []
        sink.on_done("length", 1, 5)
        assert isinstance(sink.end, Failed)  # the first end wins
        count = next(s.value for s in m.ttft.collect()[0].samples if s.name.endswith("_count"))
        assert count == 1  # one first token observed

    asyncio.run(run())
