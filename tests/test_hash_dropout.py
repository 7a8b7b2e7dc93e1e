"""`model.dropout_rng: hash` (roberta_ds/model/hash_dropout.py): the hash itself, the keep rate, pairwise
independence (neighbours, rows, successive keys), unbiased scaling, replay from a restored RNG state
under torch.compile, and the eager fallback to nn.Dropout."""

from __future__ import annotations

import math

import pytest
import torch
from test_model import V, batch, mlm_targets

from roberta_ds.config import model_config
from roberta_ds.errors import ConfigError
from roberta_ds.model.hash_dropout import HashDropout, hash_dropout, keep_mask, mix32
from roberta_ds.model.model import RobertaMLM


def mix32_reference(h: int) -> int:
    """The hash in plain Python integers (no overflow possible)."""
    h ^= h >> 16
    h = (h * 0x21F0AAAD) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x735A2D97) & 0xFFFFFFFF
    return h ^ (h >> 15)


def within(observed: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    """A binomial rate within `sigmas` standard deviations of p."""
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def as_int32(u: int) -> int:
    return u - 2**32 if u >= 2**31 else u


def test_mix32_is_the_reference_hash_in_wrapping_int32():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 123456789, 0xDEADBEEF]
    got = mix32(torch.tensor([as_int32(v) for v in values], dtype=torch.int32)).tolist()
    assert got == [as_int32(mix32_reference(v)) for v in values]


def test_mix32_is_a_bijection_on_a_sample():
    x = torch.arange(2**20, dtype=torch.int32) * 4099 + 17  # distinct inputs, some past 2^31 - 1
    assert torch.unique(mix32(x)).numel() == x.numel()


def test_threshold_compares_unsigned():
    """keep <=> hash >= round(p * 2^32) read unsigned, computed here in Python for every element."""
    shape, key, p = torch.Size([64, 48]), torch.tensor(99, dtype=torch.int32), 0.3
    k1, k2 = (mix32(k).item() % 2**32 for k in (key, key ^ -0x61C88647))  # int32 -> unsigned
    want = [mix32_reference(mix32_reference(i ^ k1) ^ k2) >= round(p * 2**32) for i in range(shape.numel())]
    assert keep_mask(shape, key, p).flatten().tolist() == want
    assert keep_mask(shape, key, 0.0).all()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate(p):
    n = 2**21
    keep = keep_mask(torch.Size([n // 1024, 1024]), torch.tensor(7, dtype=torch.int32), p)
    assert within(1 - keep.float().mean().item(), p, n)


def test_neighbours_rows_and_keys_are_pairwise_independent():
    """P(both dropped) = p^2 for adjacent elements, the same column of adjacent rows, and the same
    element under keys k and k + 1 or k ^ 1 (successive draws, successive layers)."""
    p, shape = 0.1, torch.Size([2048, 768])
    drop = ~keep_mask(shape, torch.tensor(1000, dtype=torch.int32), p)
    pairs = {
        "adjacent": drop[:, :-1] & drop[:, 1:],
        "rows": drop[:-1] & drop[1:],
        "key+1": drop & ~keep_mask(shape, torch.tensor(1001, dtype=torch.int32), p),
        "key^1": drop & ~keep_mask(shape, torch.tensor(1000 ^ 1, dtype=torch.int32), p),
    }
    for name, both in pairs.items():
        assert within(both.float().mean().item(), p * p, both.numel()), name
    assert not torch.equal(drop, ~keep_mask(shape, torch.tensor(1001, dtype=torch.int32), p))


def test_hash_dropout_zeroes_or_scales_and_is_unbiased():
    x = torch.randn(512, 768)
    y = hash_dropout(x, 0.1, torch.tensor(3, dtype=torch.int32))
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.9)
    assert within(1 - kept.float().mean().item(), 0.1, x.numel())
    ones = hash_dropout(torch.ones(1024, 1024), 0.1, torch.tensor(4, dtype=torch.int32))
    assert abs(ones.mean().item() - 1.0) < 5 * math.sqrt(0.1 / 0.9 / ones.numel())


def test_eval_is_identity_and_eager_training_is_nn_dropout():
    x = torch.randn(64, 32)
    assert HashDropout(0.1).eval()(x) is x
    assert HashDropout(0.0).train()(x) is x
    torch.manual_seed(0)
    a = HashDropout(0.1).train()(x)
    torch.manual_seed(0)
    assert torch.equal(a, torch.nn.Dropout(0.1).train()(x))
    with pytest.raises(ValueError, match="dropout probability"):
        HashDropout(1.0)


def test_compiled_mask_is_the_eager_mask_for_a_key():
    """Inductor's code for the hash (wrapping int32 products, masked shifts) gives the same bits."""
    torch._dynamo.reset()
    shape = torch.Size([300, 768])
    compiled = torch.compile(lambda key: keep_mask(shape, key, 0.1), fullgraph=True)
    for k in (0, 12345, 2**31 - 2):
        key = torch.tensor(k, dtype=torch.int32)
        assert torch.equal(compiled(key), keep_mask(shape, key, 0.1)), k
    torch._dynamo.reset()


def test_compiled_masks_replay_from_the_rng_state_and_change_every_call():
    torch._dynamo.reset()
    drop = torch.compile(HashDropout(0.1).train(), fullgraph=True)
    x = torch.ones(256, 768, requires_grad=True)
    torch.manual_seed(5)
    y1, y2 = drop(x), drop(x)
    torch.manual_seed(5)
    assert torch.equal(drop(x), y1)  # a restored state (resume, recomputation) replays the mask
    assert not torch.equal(y1, y2)
    assert within(1 - (y1 != 0).float().mean().item(), 0.1, x.numel())
    eager = torch.nn.functional.dropout(x, 0.1, training=True)
    assert not torch.equal((y1 != 0), (eager != 0))  # the hash's own bits, not Philox's
    y1.sum().backward()
    torch.testing.assert_close(x.grad, (y1 != 0).float() / 0.9)  # the same mask in backward
    torch._dynamo.reset()


def test_model_with_hash_dropout_trains_compiled_and_matches_in_eval():
    torch._dynamo.reset()
    torch.manual_seed(0)
    hashed = RobertaMLM(model_config("tiny", vocab_size=V, dropout_rng="hash"))
    plain = RobertaMLM(model_config("tiny", vocab_size=V))
    plain.load_state_dict(hashed.state_dict())
    ids = batch([16, 11, 7], T=16)
    pos, lab = mlm_targets(ids, K=4)
    with torch.no_grad():
        assert torch.equal(hashed.eval()(ids, pos, lab), plain.eval()(ids, pos, lab))
    compiled = torch.compile(hashed.train())
    losses = [compiled(ids, pos, lab) for _ in range(2)]
    assert all(torch.isfinite(v) for v in losses) and losses[0].item() != losses[1].item()
    losses[0].backward()
    assert all(torch.isfinite(p.grad).all() for p in hashed.parameters() if p.grad is not None)
    torch._dynamo.reset()


def test_unknown_dropout_rng_is_refused():
    with pytest.raises(ConfigError, match="model.dropout_rng: must be 'torch' or 'hash', got 'philox'"):
        model_config("tiny", vocab_size=V, dropout_rng="philox")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_hash_matches_the_cpu_hash_and_the_key_is_drawn_on_the_gpu():
    """Inductor's Triton code for the hash (int32 wrap, masked shifts, unsigned compare) gives the CPU
    bits; the compiled module's masks replay from the CUDA RNG state and keep 1 - p."""
    torch._dynamo.reset()
    shape = torch.Size([4096, 768])
    compiled = torch.compile(lambda key: keep_mask(shape, key, 0.1), fullgraph=True)
    for k in (0, 12345, 2**31 - 2):
        key = torch.tensor(k, dtype=torch.int32)
        assert torch.equal(compiled(key.cuda()).cpu(), keep_mask(shape, key, 0.1)), k
    drop = torch.compile(HashDropout(0.1).train(), fullgraph=True)
    x = torch.ones(shape, device="cuda", dtype=torch.bfloat16)
    torch.cuda.manual_seed(3)
    y = drop(x)
    torch.cuda.manual_seed(3)
    assert torch.equal(drop(x), y)
    assert within(1 - (y != 0).float().mean().item(), 0.1, y.numel())
    torch._dynamo.reset()
