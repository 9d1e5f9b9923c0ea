"""Read-ahead of training batches on a background thread (``data.prefetch``).

Parquet decoding (pyarrow) and most of the KJT build run without the GIL, so a reader thread
overlaps the next batches' I/O and decoding with the current step's compute, as TorchRec's train
pipelines do with their copy stream. The batches and their order are exactly those of the wrapped
iterator: prefetching changes when a batch is built, never what it is.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(it: Iterator[T], depth: int) -> Iterator[T]:
    """Yields ``it``'s items, built up to ``depth`` ahead on a daemon thread (``depth=0``: ``it``
    itself). An exception in the reader is raised here, at the item where it happened; closing the
    returned generator (a ``break`` in the consumer) stops the reader.

    Example::

        for batch in prefetch(stream.iterate(start), depth=2):
            ...
    """
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for item in it:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failure(e))

    t = threading.Thread(target=reader, name="cctl-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        t.join(timeout=5.0)
