"""The one writer of durable files, and the one reader of pickles we did not write.

Durable writes: write under a temporary name in the same directory, fsync, rename over the final
name, fsync the directory. A crash at any point leaves either the old file or the new one, never a
torn one; a full disk shows at fsync, so it fails the write rather than a later read.

    atomic_write_bytes(path, data)        # one small file (manifests, pointers, reports)
    fsync_tree(staging); os.replace(...)  # a directory built in place, then renamed
    file_sha256(path)                     # what manifests record and verification checks

Pickles: torch's weights-only unpickler, with an allowlist that holds its own safe types plus the
few DeepSpeed classes DeepSpeed puts in its checkpoint files, and nothing any library registered
process-wide. `check_pickle_safe` runs it (with mmap, so tensors are not read) before DeepSpeed's
own loader, which unpickles with `weights_only=False`, ever sees a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from roberta_ds.errors import CheckpointError


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file, or a directory (which makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable."""
    fsync_path(path)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file below `root` and every directory on the way (before renaming `root`)."""
    for dirpath, _, names in os.walk(root):
        for n in names:
            fsync_path(os.path.join(dirpath, n))
        fsync_path(dirpath)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp name in the same directory, fsync, rename over `path`, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def read_json_object(path: Path, error: type[Exception], corrupt: str, invalid: str) -> dict[str, Any]:
    """The JSON object in `path` (a manifest); anything else raises `error` naming the file:
    `corrupt` prefixes a parse error's detail, `invalid` is the whole message for a non-object."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: {corrupt} ({e})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: {invalid}")
    return raw


# ----------------------------------------------------------------------------------------------
# The weights-only unpickler

# Classes DeepSpeed 0.16-0.19 put in its own checkpoint files; nothing here runs code on load.
_DS_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


def _safe_globals() -> list[Any]:
    import importlib

    out = []
    for dotted in _DS_SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return out


@contextlib.contextmanager
def only_allowed_globals(extra: list | tuple = ()) -> Iterator[None]:
    """Within the block, torch's weights-only unpickler accepts its built-in safe types plus `extra`
    and nothing else: classes some library registered process-wide with `add_safe_globals` (e.g.
    megatron-core registers argparse.Namespace on import) are set aside meanwhile and restored after."""
    import torch

    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with torch.serialization.safe_globals(list(extra)):
            yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(registered)


def check_pickle_safe(path: Path) -> None:
    """Refuse a torch file whose pickle needs anything beyond tensors and DeepSpeed's own state classes.

    Runs the weights-only unpickler (no arbitrary code) with mmap, so the tensors are not read.
    """
    import zipfile

    import torch

    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch checkpoint archive (truncated, corrupt or another format)")
    try:
        with only_allowed_globals(_safe_globals()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any refusal is reported the same way
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        try:
            with only_allowed_globals(_safe_globals()):
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if unsafe:
                detail = f"it references {sorted(unsafe)}"
        except Exception:  # noqa: BLE001 - not a zip checkpoint at all: keep the first message
            pass
        raise CheckpointError(
            f"{path}: refused to load: {detail}. A checkpoint file must hold only tensors and DeepSpeed's "
            "own state; this one could run code when unpickled (tampered, or not from roberta-ds)"
        ) from None

