"""One in-process rank of a gloo process group for tests that build a DeepSpeed engine in pytest's own
process (test_checkpoint, test_universal_load)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def one_rank_group() -> Iterator[None]:
    """World 1 over gloo, with the environment DeepSpeed reads; torn down on exit.

    DeepSpeed caches its clone of the world group in a module global (groups._WORLD_GROUP) and does not
    drop it when the process group is destroyed: a second group in the same process would then find
    the dead clone ("Group ... is not registered"). The cache is cleared on both sides of the group."""
    from deepspeed.utils import groups

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
                     "LOCAL_WORLD_SIZE": "1"}.items():
            mp.setenv(k, v)
        mp.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR",
                                                         str(Path(sys.prefix) / "torch_extensions")))
        groups._WORLD_GROUP = None
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                             world_size=1)
        try:
            yield
        finally:
            torch.distributed.destroy_process_group()
            groups._WORLD_GROUP = None
