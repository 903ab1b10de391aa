"""The search gate: while an item write runs in a worker thread, searches on the event loop wait for it."""

from __future__ import annotations

import asyncio

from towerann.serving.retriever import SearchGate


def test_searches_wait_for_writes_and_only_for_them() -> None:
    async def scenario() -> list[str]:
        gate, order = SearchGate(), []
        assert not gate.closed
        await gate.wait_open()  # open: no wait at all

        async def write(name: str, seconds: float) -> None:
            async with gate.writing():
                order.append(f"{name} start")
                await asyncio.sleep(seconds)  # stands for the write's thread
                order.append(f"{name} end")

        async def search() -> None:
            await gate.wait_open()
            order.append("search")

        w1 = asyncio.create_task(write("w1", 0.05))
        await asyncio.sleep(0)
        assert gate.closed
        s = asyncio.create_task(search())
        w2 = asyncio.create_task(write("w2", 0.02))  # overlaps w1: the gate opens after both
        await asyncio.wait_for(asyncio.gather(w1, w2, s), 5)
        assert not gate.closed
        return order

    order = asyncio.run(scenario())
    assert order.index("search") > max(order.index("w1 end"), order.index("w2 end")), order
