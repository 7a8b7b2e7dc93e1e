"""DeepSpeed's real BF16_Optimizer (bf16, ZeRO-1, CPU, gloo, one rank) with and without the one-kernel
fp32 gradient accumulation of roberta_ds/engine/ds_grad_accum.py, for tests/test_ds_grad_accum.py.

Its own process: DeepSpeed caches the world group, so engines cannot be built in a pytest process
whose group another module already made and destroyed. Prints one JSON object (last line):

    DS_ACCELERATOR=cpu python tests/ds_scripts/grad_accum_check.py
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import deepspeed
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from roberta_ds.config import model_config
from roberta_ds.engine import ds_grad_accum
from roberta_ds.engine.optim import GuardedAdamW, param_groups
from roberta_ds.launch.dist import free_port
from roberta_ds.model.model import RobertaMLM

MODEL = model_config("tiny", vocab_size=512, max_positions=34)
MICRO, ACCUM, STEPS = 2, 4, 2


def engine(fuse: bool, immediate: bool) -> Any:
    """What train.setup builds for ds_configs/zero1_bf16.json, at a tiny size, with clipping on (1.0;
    the shipped 0.0 turns it off) so that the clipped update is compared too."""
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
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
    if type(eng.optimizer).__name__ != "BF16_Optimizer":
        raise RuntimeError(f"expected DeepSpeed's BF16_Optimizer, got {type(eng.optimizer).__name__}")
    if fuse and ds_grad_accum.fuse_grad_accumulation(eng.optimizer) != "fused":
        raise RuntimeError("the fused accumulation was not bound")
    return eng


def micro(eng: Any, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    ids = torch.randint(5, MODEL.vocab_size, (MICRO, 32), generator=g)
    pos = torch.randint(1, 31, (MICRO, 4), generator=g)
    torch.manual_seed(i)  # the same dropout masks in every engine
    loss = eng(ids, pos, ids.gather(1, pos))
    eng.backward(loss)
    return loss.detach()


def run(eng: Any) -> dict[str, list[torch.Tensor]]:
    """STEPS optimizer steps: losses, the fp32 gradient buffers before each boundary, the weights."""
    out: dict[str, list[torch.Tensor]] = {
        "initial": [p.clone() for p in eng.optimizer.fp32_groups_flat_partition], "losses": [], "buffers": [],
    }
    for step in range(STEPS):
        for m in range(ACCUM):
            out["losses"].append(micro(eng, step * ACCUM + m))
            if m == ACCUM - 2:
                out["buffers"] += [g.clone() for g in eng.optimizer.fp32_groups_gradients_flat]
            eng.step()
    out["master"] = [p.clone() for p in eng.optimizer.fp32_groups_flat_partition]
    out["bf16"] = [p.detach().clone() for p in eng.module.parameters()]
    return out


def same_bits(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> dict[str, bool]:
    return {k: len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
            for k in ("losses", "buffers", "master", "bf16")}


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def second_micro_ops(eng: Any) -> dict[str, int]:
    """aten ops of a micro-batch after the first (which creates the gradients instead of adding)."""
    micro(eng, 0)
    eng.step()
    with Ops() as ops:
        micro(eng, 1)
    eng.step()
    return {k: ops.n[k] for k in ("_to_copy", "add_", "_foreach_zero_")}


def main() -> None:
    os.environ.update({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                         world_size=1)
    try:
        reference = run(engine(fuse=False, immediate=False))
        result: dict[str, Any] = {
            "params": sum(1 for _ in RobertaMLM(MODEL).parameters()),
            "buffers_nonzero": all(bool(b.abs().sum() > 0) for b in reference["buffers"]),
            "weights_moved": not torch.equal(reference["initial"][0], reference["master"][0]),
            "losses": [float(x) for x in reference["losses"]],
            "same_bits": {f"fuse={f},immediate={i}": same_bits(reference, run(engine(f, i)))
                          for f, i in [(True, False), (True, True), (False, True)]},
            "ops": {name: second_micro_ops(engine(f, i))
                    for name, f, i in [("deepspeed", False, False), ("fused", True, False),
                                       ("fused_hooks", True, True)]},
        }
        # DeepSpeed code other than the one replaced is left alone.
        ds_grad_accum.EXPECTED_LINE = "hp_grad.add_(something_else)"
        kept = engine(fuse=False, immediate=False).optimizer
        result["other_version"] = ds_grad_accum.fuse_grad_accumulation(kept)
        result["other_version_bound"] = ds_grad_accum.is_fused(kept)
        sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)])
        result["other_optimizer"] = ds_grad_accum.fuse_grad_accumulation(sgd)
        print(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
