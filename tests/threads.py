"""Calls made from many threads at once, as the daemon's HTTP pool and streams make them."""

from __future__ import annotations

import threading
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


def run_together(work: Callable[[T], None], args: Iterable[T]) -> list[BaseException]:
    """``work(arg)`` for every arg, each on its own thread, all started before any is joined; what they raised."""
    errors: list[BaseException] = []

    def guarded(arg: T) -> None:
        try:
            work(arg)
        except BaseException as exc:  # noqa: BLE001 - every failure is reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(arg,)) for arg in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors
