"""A source's callbacks for tests: what it emitted and reported, awaitable with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from gateway.types import Event, Reading

__all__ = ["Collector"]


class Collector:
    """``emit`` and ``report_error`` for a source under test; ``wait_for`` awaits a condition."""

    def __init__(self) -> None:
        self.items: list[Reading | Event] = []
        self.errors: list[tuple[str, str]] = []
        self._changed = asyncio.Event()

    async def emit(
        self, item: Reading | Event, on_stored: Callable[[], None] | None = None
    ) -> None:
        self.items.append(item)
        if on_stored is not None:
            on_stored()
        self._changed.set()

    def report_error(self, kind: str, detail: str) -> None:
        self.errors.append((kind, detail))
        self._changed.set()

    @property
    def readings(self) -> list[Reading]:
        return [i for i in self.items if isinstance(i, Reading)]

    def events(self, kind: str | None = None) -> list[Event]:
        return [i for i in self.items if isinstance(i, Event) and kind in (None, i.kind)]

    def error_kinds(self) -> list[str]:
        return [kind for kind, _ in self.errors]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until ``condition()`` holds; fails with what was collected when the deadline passes.

        Woken by every emit and report; also re-checked every 20 ms, for conditions on a
        source's counters, which change without a callback.
        """
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.02):
                            await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"condition not met within {timeout} s; items={self.items!r} errors={self.errors!r}"
            ) from None
