"""Session fixtures shared by the test suite: the built-in corpus, a small tokenizer, shards of both.

All three are real artefacts made by the real tools (no mocks), once per session, in a temp
directory; tests must treat them as read-only (copy before corrupting). Setup takes a few
seconds: parsing the standard library (~2 s), training a 2,048-id BPE (~1 s), building shards
with 2 worker processes (~1 s).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

SMALL_VOCAB = 2048
SMALL_SHARD_TOKENS = 150_000
"""The built-in corpus gives ~420K train tokens with the small tokenizer: 3 train shards."""
SMALL_VALID_FRACTION = 0.05


@pytest.fixture(scope="session")
def builtin_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of the built-in corpus JSONL files (stdlib docstrings)."""
    from data_tools.builtin_corpus import write_builtin_corpus

    out = tmp_path_factory.mktemp("builtin_corpus")
    write_builtin_corpus(out)
    return out


@pytest.fixture(scope="session")
def small_tokenizer(builtin_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a byte-level BPE tokenizer (vocab 2,048) trained on the built-in corpus."""
    from data_tools.train_tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("small_tokenizer")
    train_tokenizer([builtin_corpus], out, vocab_size=SMALL_VOCAB)
    return out


@pytest.fixture(scope="session")
def small_shards(
    builtin_corpus: Path, small_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """build_shards output dir (train/ with 3 shards, valid/ with 1) of the built-in corpus."""
    from data_tools.build_shards import build_shards

    out = tmp_path_factory.mktemp("small_shards")
    build_shards(
        [builtin_corpus],
        small_tokenizer,
        out,
        workers=2,
        valid_fraction=SMALL_VALID_FRACTION,
        shard_tokens=SMALL_SHARD_TOKENS,
    )
    return out


SHM_BUFFERS = "deepspeed_allreduce_buffer_*"


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shm_buffers() -> Iterator[None]:
    """Safety net: DeepSpeed's CPU comm op leaves ~69 MB per rank in /dev/shm unless unlinked
    (runtime.release_shm_buffers does it in the trainer; a killed job cannot). Every job of the session
    has ended by teardown, so the session's leftovers are removed, keeping CI's RAM for the tests."""
    shm = Path("/dev/shm")
    before = set(shm.glob(SHM_BUFFERS)) if shm.is_dir() else set()
    yield
    for path in set(shm.glob(SHM_BUFFERS)) - before if shm.is_dir() else ():
        path.unlink(missing_ok=True)
