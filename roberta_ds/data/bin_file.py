"""The one reader of a shard's `.bin` tokens: `os.pread` on a lazily opened, identity-checked descriptor.

Every token read of the package goes through `ShardFile` (`ShardReader` in shards.py for tools and
index building, `read_rows` in reading.py for training). Tokens are read with `os.pread` and every
read's byte count is checked, and a descriptor is (re)opened only after `fstat` shows the file the
shard was opened with (device, inode, size). So a shard deleted, replaced or truncated while it is
read raises ShardFormatError naming the file -- never a SIGBUS from a truncated memory map, never
stale bytes of an unlinked file. `check()` also compares the path with the descriptor (and the link
count), which the training loop does once per batch for every shard the batch touches.

Descriptors are per process: a `ShardFile` pickles as (path, dtype, identity) and reopens on first
use after unpickling or fork, so DataLoader workers each read through their own. How many stay open
is bounded by a `DescriptorCache` that the files of one shard set or training run share (a corpus
of thousands of shards would otherwise exceed the usual `ulimit -n` of 1024). The cache is an
ordinary object passed in by whoever opens the shards; this module keeps no state of its own.
"""

from __future__ import annotations

import os
import stat
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from roberta_ds.errors import ShardFormatError

MAX_OPEN_SHARDS = 256
"""Descriptors a `DescriptorCache` keeps open by default (least recently used closed first)."""


class DescriptorCache:
    """The open `.bin` descriptors of one process, closing the least recently used beyond `max_open`.

    Shared by the `ShardFile`s of one shard set or run. After a fork the child starts from an empty
    table (the parent's descriptors are the parent's to close); it pickles as `max_open` alone, so
    the files unpickled together in a DataLoader worker share one fresh cache.
    """

    def __init__(self, max_open: int = MAX_OPEN_SHARDS) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.max_open = max_open
        self._files: OrderedDict[ShardFile, None] = OrderedDict()  # least recently used first
        self._pid = os.getpid()

    def _table(self) -> OrderedDict[ShardFile, None]:
        if self._pid != os.getpid():  # a forked child: the parent's table is not ours
            self._files = OrderedDict()
            self._pid = os.getpid()
        return self._files

    def touch(self, f: ShardFile) -> None:
        """Mark `f` (its descriptor open) most recently used; close the least recently used beyond
        `max_open`."""
        files = self._table()
        files[f] = None
        files.move_to_end(f)
        while len(files) > self.max_open:
            files.popitem(last=False)[0].close()

    def forget(self, f: ShardFile) -> None:
        """`f` closed its descriptor."""
        self._table().pop(f, None)

    def __len__(self) -> int:
        """Descriptors this process holds open through the cache."""
        return len(self._table())

    def __getstate__(self) -> dict[str, Any]:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(int(state["max_open"]))


class ShardFile:
    """One shard's `.bin`, read with `os.pread`; pickles as (path, dtype, identity, cache), reopens lazily.

    `identity` is (st_dev, st_ino, st_size) of the file the shard was opened with; (re)opening
    (after fork, unpickling or a cache eviction) refuses any other file, so closing a descriptor
    never lets a replaced file in. `cache`: the DescriptorCache bounding the open descriptors; with
    None the descriptor stays open until `close()` or garbage collection.
    """

    def __init__(
        self,
        path: Path,
        dtype: np.dtype,
        identity: tuple[int, int, int],
        cache: DescriptorCache | None = None,
    ) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.identity = tuple(identity)
        self.cache = cache
        self._fd: int | None = None
        self._pid = -1

    @property
    def max_open(self) -> int:
        """How many descriptors may be open at once alongside this one (its cache's bound)."""
        return self.cache.max_open if self.cache is not None else sys.maxsize

    def _gone(self, why: str) -> ShardFormatError:
        return ShardFormatError(
            f"{self.path}: {why} while the data pipeline had it open; shards must not change during a run "
            "(restore the file, or restart so the index is rebuilt)"
        )

    def fd(self) -> int:
        """This process's descriptor of the file, opened (and checked to be the same file) on first use."""
        pid = os.getpid()
        if self._fd is not None and self._pid == pid:
            if self.cache is not None:
                self.cache.touch(self)
            return self._fd
        if self._fd is not None:  # inherited through fork: close the child's copy, open our own
            os.close(self._fd)
            self._fd = None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise self._gone("deleted") from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size) != self.identity:
            os.close(fd)
            if (st.st_dev, st.st_ino) != self.identity[:2]:
                raise self._gone("replaced by another file")
            raise self._gone(f"truncated or resized ({st.st_size} bytes, was {self.identity[2]})")
        self._fd, self._pid = fd, pid
        if self.cache is not None:
            self.cache.touch(self)
        return fd

    def check(self) -> None:
        """Is the path still the file we read, with its size? (the loader calls it once per batch)"""
        fd = self.fd()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise self._gone("deleted or renamed") from None
        fst = os.fstat(fd)
        if fst.st_nlink == 0 or not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != self.identity[:2]:
            raise self._gone("deleted or replaced")
        if st.st_size != self.identity[2] or fst.st_size != self.identity[2]:
            raise self._gone(f"truncated or resized ({fst.st_size} bytes, was {self.identity[2]})")

    def read(self, start: int, count: int, fd: int | None = None) -> np.ndarray:
        """Tokens [start, start + count) as a read-only (count,) array of the shard's dtype; `fd`: this
        file's descriptor from `fd()` when the caller already holds it (read_rows, once per batch)."""
        if count == 0:
            return np.zeros(0, self.dtype)
        nbytes, offset = count * self.dtype.itemsize, start * self.dtype.itemsize
        data = os.pread(self.fd() if fd is None else fd, nbytes, offset)
        if len(data) != nbytes:
            raise self._gone(f"truncated (read {len(data)} of {nbytes} bytes at offset {offset})")
        return np.frombuffer(data, dtype=self.dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "dtype": self.dtype.str, "identity": self.identity, "cache": self.cache
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(Path(state["path"]), np.dtype(state["dtype"]), state["identity"], state.get("cache"))

    def close(self) -> None:
        """Close this process's descriptor (a later read reopens it, checking the identity)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
            if self.cache is not None:
                self.cache.forget(self)
        self._fd = None

    def __del__(self) -> None:
        if hasattr(self, "_fd"):  # not when __init__ failed
            self.close()
