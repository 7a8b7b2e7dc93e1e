"""The training data pipeline: shard sets -> blocks -> blended global order -> rank slices -> masked batches.

    data = open_train_data(cfg)                       # validate sources, pack blocks, build the blend
    for batch in train_loader(data, cfg, plan=BatchPlan.of(m, a, w), rank=r,
                              start_step=s):          # micro-batches in order, forever
        loss = model(batch["input_ids"], batch["mlm_positions"], batch["mlm_labels"])

Pieces (one job per file): blocks.py packs sentences into blocks; reading.py opens shard sets and
reads blocks' rows through bin_file.py's pread reader (never a memory map); sampling.py defines the
global order, the blend and the rank slices; masking.py masks and collates. This file ties them
together and runs the DataLoader.

Nothing is cached on disk: every process builds the same index from the shards' `.idx` files, so
no two ranks or nodes ever race on a cache file.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from roberta_ds.config import DataConfig, DataSource
from roberta_ds.data.bin_file import DescriptorCache, ShardFile
from roberta_ds.data.masking import MaskingCollator, MaskSpec, mask_slots
from roberta_ds.data.order import DataOrder
from roberta_ds.data.reading import Source, open_source, read_rows
from roberta_ds.data.sampling import BatchPlan, Blend, micro_batch_indices
from roberta_ds.data.shard_set import Manifest
from roberta_ds.errors import ConfigError, UserError

__all__ = [
    "BatchPlan",
    "DescriptorCache",
    "ShardFile",
    "TrainData",
    "open_train_data",
    "train_loader",
    "valid_batches",
    "mask_slots",
    "micro_batch_indices",
]

VALID_SEED = 0
"""Validation masks use this fixed seed (epoch 0), so runs with different training seeds compare."""
LOCATE_CHUNK = 1 << 16
"""Stream positions resolved per vectorised `Blend.locate` call (cached: batches are contiguous)."""


def _check_same_tokenizer(manifests: dict[str, Manifest]) -> Manifest:
    first_path, first = next(iter(manifests.items()))
    for path, m in manifests.items():
        if (m.tokenizer_sha256, m.vocab_size, m.special_ids) != (
            first.tokenizer_sha256,
            first.vocab_size,
            first.special_ids,
        ):
            raise ConfigError(
                f"data sources {first_path} and {path} were made with different tokenizers (sha256 "
                f"{first.tokenizer_sha256[:12]}... vs {m.tokenizer_sha256[:12]}...); every shard set "
                "of a run must be built with the same tokenizer"
            )
    return first


class TrainData:
    """Opened training sources + their blend. Pickles by value (arrays + ShardFile paths; their
    DescriptorCache pickles empty, so each DataLoader worker opens its own descriptors)."""

    def __init__(self, sources: list[Source], weights: list[float], cfg: DataConfig) -> None:
        self.sources = sources
        self.cfg = cfg
        self.manifest = _check_same_tokenizer({s.path: s.manifest for s in sources})
        self.blend = Blend.make([len(s.blocks) for s in sources], weights, cfg.seed)
        self._chunk: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def samples_per_epoch(self) -> int:
        return self.blend.epoch_size

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self.manifest.special_ids)

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest.tokenizer_sha256

    def locate(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stream indices -> (source, block, epoch): `Blend.locate`, resolved a chunk at a time."""
        k = np.asarray(k, dtype=np.int64)
        chunk, off = np.divmod(k, LOCATE_CHUNK)
        out = [np.empty(k.shape, np.int64) for _ in range(3)]
        for c in np.unique(chunk).tolist():
            if c not in self._chunk:
                if len(self._chunk) >= 4:
                    self._chunk.pop(next(iter(self._chunk)))
                self._chunk[c] = self.blend.locate(np.arange(c * LOCATE_CHUNK, (c + 1) * LOCATE_CHUNK))
            sel = chunk == c
            for o, arr in zip(out, self._chunk[c]):
                o[sel] = arr[off[sel]]
        return out[0], out[1], out[2]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_chunk": {}}

    def rows(self, src: np.ndarray, block: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return read_rows(self.sources, src, block, self.cfg.max_seq_len, self.special_ids)


def _open_sources(
    sources: tuple[DataSource, ...], cfg: DataConfig, field: str, descriptors: DescriptorCache
) -> list[Source]:
    if not sources:
        raise ConfigError(f"data.{field}: no shard sets given (build them with `roberta-ds build-shards`)")
    return [open_source(s.path, cfg, descriptors) for s in sources]


def open_train_data(cfg: DataConfig, descriptors: DescriptorCache | None = None) -> TrainData:
    """Open and check every training shard set, pack blocks, build the blend. No cache file is written.

    Every shard's `.bin` keeps its descriptor in `descriptors` (a new DescriptorCache when None):
    one bound on the open descriptors for the whole run, per process."""
    if descriptors is None:
        descriptors = DescriptorCache()
    sources = _open_sources(cfg.train, cfg, "train", descriptors)
    return TrainData(sources, [s.weight for s in cfg.train], cfg)


class MicroBatchDataset(torch.utils.data.Dataset):
    """Item i = the i-th micro-batch this rank consumes from `start_step` on, masked and collated."""

    def __init__(self, data: TrainData, collator: MaskingCollator, *, plan: BatchPlan, rank: int, start_step: int,
                 order: DataOrder = DataOrder()) -> None:
        self.data, self.collator, self.order = data, collator, order
        self.plan, self.rank, self.start_step = plan, rank, start_step

    def indices(self, i: int) -> np.ndarray:
        step, micro_step = divmod(self.start_step * self.plan.grad_accum + i, self.plan.grad_accum)
        # the step's global batch: `step` unless the order moved
        return micro_batch_indices(self.plan, self.order.batch_at(step), micro_step, self.rank)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k = self.indices(i)
        src, block, epoch = self.data.locate(k)
        rows, sentence_starts = self.data.rows(src, block)
        return self.collator(rows, k, epoch, sentence_starts)


class _Forever(torch.utils.data.Sampler):
    def __iter__(self) -> Iterator[int]:
        return itertools.count()


def _check_loader_args(data: TrainData, cfg: DataConfig, plan: BatchPlan, rank: int, start_step: int) -> None:
    if not 0 <= rank < plan.world_size:
        raise ConfigError(f"train_loader: need 0 <= rank < world_size, got rank {rank}, world_size {plan.world_size}")
    if start_step < 0:
        raise ConfigError(f"train_loader: start_step must be >= 0, got {start_step}")
    for f in ("train", "max_seq_len", "packing", "seed"):
        if getattr(cfg, f) != getattr(data.cfg, f):
            raise ConfigError(f"train_loader: data.{f} differs from the config open_train_data was given")


def train_loader(
    data: TrainData,
    cfg: DataConfig,
    *,
    plan: BatchPlan,
    rank: int,
    start_step: int,
    word_starts: np.ndarray | None = None,
    pin_memory: bool = False,
    unpad: bool = False,
    order: DataOrder = DataOrder(),
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches in order, forever: step `start_step` micro-step 0 first. Step s takes
    global batch `order.batch_at(s)` (s itself in the plain order), split as `plan` says.

    Each is {input_ids (B, T), mlm_positions (B, K), mlm_labels (B, K), sample_index (B,),
    num_tokens (), and with `unpad` unpad_index (N,)}, all int64, B = plan.micro_batch,
    T = cfg.max_seq_len, K = mask_slots(cfg). Built by
    `cfg.num_workers` persistent DataLoader workers, each collating whole micro-batches; the result
    does not depend on the worker count.
    """
    _check_loader_args(data, cfg, plan, rank, start_step)
    spec = MaskSpec.make(cfg, data.vocab_size, data.special_ids, word_starts)
    dataset = MicroBatchDataset(data, MaskingCollator(spec, cfg.seed, unpad), plan=plan, rank=rank,
                                start_step=start_step, order=order)
    workers = cfg.num_workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=_Forever(),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return _batches(iter(loader))


def _batches(it: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield from the DataLoader; on an error, re-raise it without the worker traceback text.

    Dropping the original traceback also breaks the exception <-> frame cycle that would keep the
    DataLoader iterator alive until a garbage collection, where its worker shutdown can stall.
    """
    try:
        while True:
            yield next(it)
    except UserError as e:
        err_type, msg = type(e), str(e)
        # From a worker: "Caught ShardFormatError in DataLoader worker ... <module>.<Class>: <message>"
        marker = f"{err_type.__module__}.{err_type.__qualname__}: "
        if marker in msg:
            msg = msg.rsplit(marker, 1)[1].rstrip("\n")
        e.__traceback__ = None
    finally:
        del it  # shuts the workers down now (normally, not from inside a garbage collection)
    raise err_type(msg)


def valid_batches(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    micro_batch: int,
    max_batches: int,
    word_starts: np.ndarray | None = None,
    unpad: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Deterministically masked validation micro-batches of this rank (seed VALID_SEED, epoch 0).

    The samples are the blocks of `cfg.valid`'s sets in order (their union, no shuffle); global
    batch g is samples [g B, (g + 1) B), B = micro_batch * world_size, sliced by rank. Every rank gets
    the same number of batches, min(max_batches, ceil(blocks / B)); slots past the last block are
    filler rows `<s> </s>` with no masked position (labels all -100, sample_index -1), so sum the
    loss and the label count over batches rather than averaging per batch.
    """
    if min(world_size, micro_batch) < 1 or not 0 <= rank < world_size or max_batches < 0:
        raise ConfigError(
            "valid_batches: need 0 <= rank < world_size, micro_batch >= 1, max_batches >= 0; got "
            f"rank={rank}, world_size={world_size}, micro_batch={micro_batch}, max_batches={max_batches}"
        )
    sources = _open_sources(cfg.valid, cfg, "valid", DescriptorCache())
    # The sets agree with each other here; that they match the run's tokenizer (and the training sets)
    # is checked once, at setup (engine/setup.check_data_tokenizer).
    manifest = _check_same_tokenizer({s.path: s.manifest for s in sources})
    special = dict(manifest.special_ids)
    spec = MaskSpec.make(cfg, manifest.vocab_size, special, word_starts)
    collator = MaskingCollator(spec, VALID_SEED, unpad)
    sizes = np.cumsum([0] + [len(s.blocks) for s in sources])
    total, per_batch = int(sizes[-1]), micro_batch * world_size
    out = []
    for g in range(min(max_batches, -(-total // per_batch))):
        k = np.arange(
            g * per_batch + rank * micro_batch, g * per_batch + (rank + 1) * micro_batch, dtype=np.int64
        )
        real = k < total
        src = np.searchsorted(sizes, k[real], side="right") - 1
        rows = np.full((micro_batch, cfg.max_seq_len), special["pad"], dtype=np.int64)
        rows[~real, 0], rows[~real, 1] = special["bos"], special["eos"]
        starts = np.zeros(rows.shape, dtype=bool) if cfg.whole_word_mask else None
        rows[real], got = read_rows(sources, src, k[real] - sizes[src], cfg.max_seq_len, special)
        if starts is not None and got is not None:
            starts[real] = got
        out.append(collator(rows, np.where(real, k, -1), np.zeros(micro_batch, dtype=np.int64), starts))
    return out
