"""engine/optim.py: `lr_at` (linear warmup + decay), `param_groups` (weight decay on matrices only),
`GuardedAdamW` (a skipped step leaves parameters and state bitwise unchanged; the agreed flag)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import tiny_model

from roberta_ds.config import (
    OPTIM_PRESETS,
    OptimConfig,
)
from roberta_ds.engine.optim import GuardedAdamW, lr_at, param_groups

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = REPO / "ds_configs"
# ----------------------------------------------------------------------------------------------
# The schedule and the optimizer (optim.py)


def test_lr_schedule_base() -> None:
    o = OptimConfig()
    assert lr_at(0, o) == pytest.approx(6e-4 / 24_000)
    assert lr_at(11_999, o) == pytest.approx(3e-4)
    assert lr_at(23_999, o) == pytest.approx(6e-4)
    assert lr_at(24_000, o) == pytest.approx(6e-4)
    assert lr_at(262_000, o) == pytest.approx(3e-4)  # half way down the decay
    assert lr_at(500_000, o) == 0.0 and lr_at(600_000, o) == 0.0
    warm = [lr_at(s, o) for s in range(0, 24_000, 1000)]
    decay = [lr_at(s, o) for s in range(24_000, 500_001, 10_000)]
    assert warm == sorted(warm) and decay == sorted(decay, reverse=True)


def test_lr_schedule_large_and_edges() -> None:
    large = OPTIM_PRESETS["roberta-large"]
    assert lr_at(29_999, large) == pytest.approx(4e-4)
    assert lr_at(30_000 + (500_000 - 30_000) // 2, large) == pytest.approx(2e-4)
    no_warmup = OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10, end_lr=1e-4)
    assert lr_at(0, no_warmup) == pytest.approx(1e-3)
    assert lr_at(5, no_warmup) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(10, no_warmup) == pytest.approx(1e-4) and lr_at(99, no_warmup) == pytest.approx(1e-4)


def test_weight_decay_only_on_matrices() -> None:
    model = tiny_model(512, max_positions=34)
    groups = param_groups(model, 0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert sum(len(g["params"]) for g in groups) == len(names)  # each parameter once (tied decoder too)
    assert {
        "embeddings.word.weight",
        "embeddings.position.weight",
        "layers.0.attn.qkv.weight",
        "layers.1.ffn.proj.weight",
        "head.dense.weight",
    } <= decay
    assert all(n.endswith(".bias") or "norm" in n for n in no_decay)
    assert all(not n.endswith(".bias") and "norm" not in n for n in decay)
    assert {
        "head.bias",
        "embeddings.norm.weight",
        "layers.0.attn_norm.weight",
        "layers.1.ffn.fc.bias",
    } <= no_decay


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))


def _grads(model: torch.nn.Module, seed: int, poison: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    if poison:
        grads[3].view(-1)[5] = float("nan")
    return grads


def _set_grads(model: torch.nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_guarded_adamw_skips_nonfinite_steps_bitwise(fused: bool) -> None:
    """(finite, NaN, finite) with GuardedAdamW == (finite, finite) with torch's AdamW, bitwise."""
    kw: dict[str, Any] = {"lr": 1e-2, "betas": (0.9, 0.98), "eps": 1e-6, "fused": fused}
    ours, ref = _small_net(), _small_net()
    opt = GuardedAdamW(param_groups(ours, 0.01), **kw)
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.01), **kw)

    _set_grads(ours, _grads(ours, 1))
    opt.step()
    assert float(opt.skipped) == 0.0
    before = [p.detach().clone() for p in ours.parameters()]
    state = {k: v.clone() for k, v in opt.state[next(ours.parameters())].items()}
    _set_grads(ours, _grads(ours, 2, poison=True))
    opt.step()
    assert float(opt.skipped) == 1.0
    assert all(torch.equal(a, p) for a, p in zip(before, ours.parameters())), (
        "a skipped step moved parameters"
    )
    after = opt.state[next(ours.parameters())]
    assert all(torch.equal(state[k], after[k]) for k in state), "a skipped step changed Adam's state"
    _set_grads(ours, _grads(ours, 3))
    opt.step()

    for seed in (1, 3):
        _set_grads(ref, _grads(ref, seed))
        ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))


def test_guarded_adamw_follows_the_agreed_flag() -> None:
    """Finite gradients here, but another rank flagged: the all-reduced flag decides (the skip is global)."""
    model = _small_net()
    calls: list[float] = []

    def other_rank_flags(flag: torch.Tensor) -> None:
        calls.append(float(flag))
        flag.fill_(1.0)

    opt = GuardedAdamW(param_groups(model, 0.01), lr=1e-2, fused=False, all_reduce_max=other_rank_flags)
    before = [p.detach().clone() for p in model.parameters()]
    _set_grads(model, _grads(model, 1))
    opt.step()
    assert calls == [0.0] and float(opt.skipped) == 1.0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
