"""DeepSpeed's ZeRO-3 universal-checkpoint load and our repair of it (roberta_ds/checkpoint/universal_load.py).

One process (gloo, world 1), the tiny model, ZeRO-3 fp32 with the trainer's GuardedAdamW and its two
parameter groups (decay 0.01 / no decay). Engine A trains 2 steps and saves; DeepSpeed's
`ds_to_universal` converts the save; engine B (a fresh model) loads the conversion as train.setup
does on a world-size change. Then both take step 3 on the same batch:
- DeepSpeed alone leaves B with one `step` tensor shared by both groups and group 0's weight decay
  in the no-decay group (this test documents the upstream bug: it fails once DeepSpeed fixes it);
- repaired, B's groups count their own steps (3 after step 3, not 4) and B's parameters after step 3
  are bitwise A's.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from one_rank import one_rank_group

from roberta_ds.checkpoint.universal_load import hyperparameters, repair_zero3_universal_load
from roberta_ds.config import model_config
from roberta_ds.engine.optim import GuardedAdamW, param_groups
from roberta_ds.model.model import RobertaMLM

MODEL = model_config("tiny", vocab_size=512, max_positions=18, dropout=0.0, attention_dropout=0.0)
BATCH, SEQ, DECAY = 2, 16, 0.01


def _batch(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, MODEL.vocab_size, (BATCH, SEQ), generator=g)
    positions = torch.tensor([[1, 3, 5]] * BATCH)
    return ids, positions, ids.gather(1, positions)


def _engine(load_universal: bool = False) -> Any:
    import deepspeed

    torch.manual_seed(0)
    model = RobertaMLM(MODEL)
    opt = GuardedAdamW(param_groups(model, DECAY), lr=1e-3, fused=False)
    ds = {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH, "steps_per_print": 10**9,
          "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
          "checkpoint": {"load_universal": load_universal}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
    return engine


def _step(engine: Any, seed: int) -> None:
    loss = engine(*_batch(seed))
    engine.backward(loss)
    engine.step()


def _steps(engine: Any) -> list[torch.Tensor]:
    """The Adam step counter of each ZeRO-3 sub-group (one per parameter group here)."""
    opt = engine.optimizer
    return [opt.optimizer.state[flat]["step"] for flat in opt.fp32_partitioned_groups_flat]


def _params(engine: Any) -> list[torch.Tensor]:
    return [flat.detach().clone() for flat in engine.optimizer.fp32_partitioned_groups_flat]


@pytest.fixture(scope="module")
def universal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[torch.Tensor]]]:
    """(the universal conversion of engine A's step-2 save, A's fp32 partitions after step 3)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    with one_rank_group():
        root = tmp_path_factory.mktemp("universal_load")
        a = _engine()
        for seed in (1, 2):
            _step(a, seed)
        a.save_checkpoint(str(root), tag="step2")
        ds_to_universal(argparse.Namespace(
            input_folder=str(root / "step2"), output_folder=str(root / "step2_universal"),
            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
            inject_missing_state=False))
        _step(a, 3)
        yield root, _params(a)


def _loaded(root: Path) -> Any:
    b = _engine(load_universal=True)
    hyper = hyperparameters(b.optimizer.optimizer)
    loaded, _ = b.load_checkpoint(str(root), tag="step2_universal", load_optimizer_states=True,
                                  load_lr_scheduler_states=False)
    assert loaded is not None
    return b, hyper


def test_deepspeed_alone_shares_one_step_and_decays_every_group(universal) -> None:
    root, _ = universal
    b, _ = _loaded(root)
    steps = _steps(b)
    assert len(steps) == 2 and steps[0] is steps[1]  # one tensor object for both groups
    assert [g["weight_decay"] for g in b.optimizer.optimizer.param_groups] == [DECAY, DECAY]
    _step(b, 3)
    assert [float(s) for s in _steps(b)] == [4.0, 4.0]  # step 3 counted twice


def test_repaired_load_continues_exactly(universal) -> None:
    root, after_a = universal
    b, hyper = _loaded(root)
    assert [h["weight_decay"] for h in hyper] == [DECAY, 0.0]
    assert repair_zero3_universal_load(b, hyper, adam_steps=2)
    steps = _steps(b)
    assert steps[0] is not steps[1] and [float(s) for s in steps] == [2.0, 2.0]
    assert [g["weight_decay"] for g in b.optimizer.optimizer.param_groups] == [DECAY, 0.0]
    _step(b, 3)
    assert [float(s) for s in _steps(b)] == [3.0, 3.0]
    after_b = _params(b)
    assert all(torch.equal(x, y) for x, y in zip(after_a, after_b)), "step 3 after the repaired load differs"
