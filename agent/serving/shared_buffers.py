"""Large bodies and decoded tensors handed between the daemon and its decoding helper without copies.

Pickling a 60 MiB body to the helper, and the decoded arrays back, means three large copies in the
daemon, each holding the GIL (and touching fresh pages) for tens of milliseconds while every other
request waits. Instead the body is received chunk by chunk straight into a shared-memory block, the
helper parses it in place and writes the decoded arrays into a second block, and the daemon maps
those arrays without copying. The daemon owns both blocks and unlinks them when the request is done.
"""

from __future__ import annotations

from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np


class SharedBody:
    """A request body of known length, written into shared memory as it arrives."""

    def __init__(self, size: int):
        self.size = size
        self.shm = SharedMemory(create=True, size=max(1, size))
        self.filled = 0

    def write(self, chunk: bytes) -> bool:
        """Append ``chunk``; False when the body would run past its declared length."""
        end = self.filled + len(chunk)
        if end > self.size:
            return False
        self.shm.buf[self.filled:end] = chunk
        self.filled = end
        return True

    @property
    def name(self) -> str:
        return self.shm.name

    def release(self) -> None:
        release(self.shm)


#: blocks unlinked while arrays still mapped them: closed on a later release, once those are gone
#: (dropping them instead would make SharedMemory.__del__ print an ignored BufferError on stderr)
_closing: list[SharedMemory] = []


def release(shm: SharedMemory) -> None:
    """Unlink ``shm`` now and close it as soon as no array maps it any more."""
    try:
        shm.unlink()
    except FileNotFoundError:
        pass
    _closing.append(shm)
    for block in list(_closing):
        try:
            block.close()
        except BufferError:  # still mapped by an array someone holds: retried on the next release
            continue
        _closing.remove(block)


def disown(shm: SharedMemory) -> None:
    """Keep this process's resource tracker from unlinking ``shm`` when the process exits: the other
    side owns the block and unlinks it when it is done (Python < 3.13 has no ``track=False``)."""
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001 - the documented workaround
    except (AttributeError, KeyError, ValueError):
        pass


def attach(name: str) -> SharedMemory:
    """Open a block the other side created; the caller decides who unlinks it."""
    return SharedMemory(name=name)


def pack_arrays(arrays: dict[str, np.ndarray]) -> tuple[str, list] | None:
    """Copy numeric ``arrays`` into a new shared block; (its name, layout) or None for object arrays."""
    if any(array.dtype.kind == "O" for array in arrays.values()):
        return None
    layout, offset = [], 0
    for name, array in arrays.items():
        layout.append((name, array.dtype.str, array.shape, offset))
        offset += -(-array.nbytes // 64) * 64  # 64-byte aligned, as runtimes like their inputs
    shm = SharedMemory(create=True, size=max(1, offset))
    try:
        for (name, dtype, shape, start), array in zip(layout, arrays.values()):
            np.ndarray(shape, dtype, shm.buf, start)[...] = array
        disown(shm)  # the daemon owns it now
        return shm.name, layout
    finally:
        shm.close()


def map_arrays(name: str, layout: list) -> tuple[SharedMemory, dict[str, np.ndarray]]:
    """The arrays ``pack_arrays`` wrote, mapped in place (no copy); release the block when done."""
    shm = SharedMemory(name=name)
    arrays = {}
    for key, dtype, shape, start in layout:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        # frombuffer holds a buffer export: closing the block while an array maps it raises BufferError
        # (release() then leaves it to the collector) instead of unmapping memory still in use.
        arrays[key] = np.frombuffer(shm.buf, dtype, count, start).reshape(tuple(shape))
    return shm, arrays
