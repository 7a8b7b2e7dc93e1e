"""The one-kernel fp32 gradient accumulation (roberta_ds/ds_grad_accum.py) on DeepSpeed's real
BF16_Optimizer (bf16, ZeRO-1, CPU, gloo, one rank): the same bits as DeepSpeed's own two-kernel path,
through the micro-batch buffers, the clipped steps and the master weights, with and without
`bf16.immediate_grad_update`; one cast per parameter and micro-batch fewer; refused where DeepSpeed's
code is not the one it replaces."""

from __future__ import annotations

import os
import socket
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from roberta_ds import ds_grad_accum
from roberta_ds.config import model_config
from roberta_ds.model import RobertaMLM
from roberta_ds.optim import GuardedAdamW, param_groups

MODEL = model_config("tiny", vocab_size=512, max_positions=34)
MICRO, ACCUM, STEPS = 2, 4, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ds() -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
                     "LOCAL_WORLD_SIZE": "1"}.items():
            mp.setenv(k, v)
        mp.setenv("TORCH_EXTENSIONS_DIR",
                  os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")))
        import deepspeed

        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                             rank=0, world_size=1)
        try:
            yield deepspeed
        finally:
            torch.distributed.destroy_process_group()


def _engine(deepspeed: Any, fuse: bool, immediate: bool) -> Any:
    """What train.setup builds for ds_configs/zero1_bf16.json, at a tiny size."""
    torch.manual_seed(0)
    model = RobertaMLM(MODEL)
    opt = GuardedAdamW(param_groups(model, 0.01), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, fused=False)
    config = {
        "train_batch_size": MICRO * ACCUM, "train_micro_batch_size_per_gpu": MICRO,
        "gradient_clipping": 1.0, "steps_per_print": 10**9,
        "bf16": {"enabled": True, "immediate_grad_update": immediate},
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config,
                                           dist_init_required=False)
    assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    if fuse:
        assert ds_grad_accum.fuse_grad_accumulation(engine.optimizer) == "fused"
    return engine


def _micro(engine: Any, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    ids = torch.randint(5, MODEL.vocab_size, (MICRO, 32), generator=g)
    pos = torch.randint(1, 31, (MICRO, 4), generator=g)
    torch.manual_seed(i)  # the same dropout masks in every engine
    loss = engine(ids, pos, ids.gather(1, pos))
    engine.backward(loss)
    return loss.detach()


def _run(engine: Any) -> dict[str, Any]:
    """STEPS optimizer steps: losses, the fp32 gradient buffer before each boundary, master weights."""
    out: dict[str, Any] = {"losses": [], "buffers": [],
                           "initial": [p.clone() for p in engine.optimizer.fp32_groups_flat_partition]}
    for step in range(STEPS):
        for m in range(ACCUM):
            out["losses"].append(_micro(engine, step * ACCUM + m))
            if m == ACCUM - 2:
                out["buffers"].append([g.clone() for g in engine.optimizer.fp32_groups_gradients_flat])
            engine.step()
    out["master"] = [p.clone() for p in engine.optimizer.fp32_groups_flat_partition]
    out["bf16"] = [p.detach().clone() for p in engine.module.parameters()]
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert torch.equal(torch.stack(a["losses"]), torch.stack(b["losses"]))
    for x, y in zip(a["buffers"], b["buffers"], strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))
    assert all(torch.equal(u, v) for u, v in zip(a["master"], b["master"], strict=True))
    assert all(torch.equal(u, v) for u, v in zip(a["bf16"], b["bf16"], strict=True))


def test_fused_accumulation_gives_deepspeeds_bits(ds: Any) -> None:
    reference = _run(_engine(ds, fuse=False, immediate=False))
    assert any(g.abs().sum() > 0 for g in reference["buffers"][0])  # the buffers hold real gradients
    assert not torch.equal(reference["initial"][0], reference["master"][0])  # and the steps moved weights
    for fuse, immediate in [(True, False), (True, True), (False, True)]:
        _same(reference, _run(_engine(ds, fuse=fuse, immediate=immediate)))


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(engine: Any) -> Counter[str]:
    _micro(engine, 0)  # the first micro-batch of a step differs (gradients are created, not added to)
    engine.step()
    with _Ops() as ops:
        _micro(engine, 1)
    engine.step()
    return ops.n


def test_one_cast_fewer_per_parameter_and_micro_batch(ds: Any) -> None:
    theirs = _backward_ops(_engine(ds, fuse=False, immediate=False))
    ours = _backward_ops(_engine(ds, fuse=True, immediate=False))
    params = sum(1 for p in RobertaMLM(MODEL).parameters())
    assert theirs["_to_copy"] - ours["_to_copy"] == params
    assert theirs["add_"] == ours["add_"]
    # With immediate_grad_update the bf16 gradients are dropped after each parameter's hook instead of
    # zeroed and added into: one multi-tensor zero and one add per parameter fewer on top.
    hooked = _backward_ops(_engine(ds, fuse=True, immediate=True))
    assert ours["add_"] - hooked["add_"] == params and hooked["_foreach_zero_"] == 0 < ours["_foreach_zero_"]


def test_other_deepspeed_code_is_left_alone(ds: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds_grad_accum, "EXPECTED_LINE", "hp_grad.add_(something_else)")
    engine = _engine(ds, fuse=False, immediate=False)
    why = ds_grad_accum.fuse_grad_accumulation(engine.optimizer)
    assert why.startswith("kept: ") and "not the version" in why
    assert "_update_hp_grad" not in vars(engine.optimizer)
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)])
    assert ds_grad_accum.fuse_grad_accumulation(sgd) == "n/a"
