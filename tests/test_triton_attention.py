"""The Triton attention kernel (`model.attention_kernel: triton`) against its plain-torch specification.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py before
anything imports Triton), in fp16; with CUDA the same tests run compiled, in fp16 and bf16
(scripts/gpu_check.sh). The keep-bit statistics are pure torch.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton  # noqa: F401  (a test dependency: the `test` extra installs it)
from test_model import PAD, V, batch, mlm_targets

from roberta_ds import attention
from roberta_ds import triton_attention as ta
from roberta_ds.config import model_config, resolve_auto
from roberta_ds.errors import ConfigError
from roberta_ds.masking import unpad_index
from roberta_ds.model import RobertaMLM

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]  # the interpreter's bf16 dot is wrong
# Segments: empty, one token, shorter than a block, whole blocks, several blocks with a ragged end.
LENGTHS = (5, 0, 40, 1, 17, 32, 33)


@pytest.fixture(autouse=True, scope="module")
def one_config():
    """On a GPU: each kernel's first configuration, not the autotuned choice among four (a minute of
    compilation less in scripts/gpu_check.sh); bench/attention_kernels.py checks the tuned ones against
    FlashAttention-2. The kernels are rebuilt after this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROBERTA_DS_TRITON_ATTN_TUNE", "0")
        ta._kernels.cache_clear()
        yield
    ta._kernels.cache_clear()



def segments(lengths=LENGTHS, heads: int = 2, d: int = 32, dtype=torch.float16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.randn(int(offsets[-1]), 3, heads, d, generator=g)
    return qkv.to(DEV, dtype), offsets.to(DEV)


def run_kernel(qkv, offsets, p: float, key: int):
    x = qkv.detach().clone().requires_grad_()
    out = ta.attention(x, offsets, max(LENGTHS), p, torch.tensor(key, dtype=torch.int32, device=DEV))
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    out.backward(upstream.to(out.dtype))
    return out.float(), x.grad.float(), upstream


def run_reference(qkv, offsets, p: float, key: int, upstream):
    x = qkv.detach().float().clone().requires_grad_()
    out = ta.reference_attention(x, offsets.cpu(), p, key)
    out.backward(upstream.float())
    return out, x.grad


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= tol * max(scale, 1.0), (a - b).abs().max().item()


@pytest.mark.parametrize("backward", ta.BACKWARDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_output_and_gradient_match_the_specification(dtype, p, backward, monkeypatch):
    monkeypatch.setenv("ROBERTA_DS_TRITON_ATTN_BWD", backward)
    qkv, offsets = segments(dtype=dtype)
    out, grad, upstream = run_kernel(qkv, offsets, p, key=12345)
    ref_out, ref_grad = run_reference(qkv, offsets, p, 12345, upstream)
    close(out, ref_out, dtype)
    close(grad, ref_grad, dtype)
    # with dropout the kernel's keep bits are the specification's: another key gives other outputs
    if p > 0:
        other, _ = run_reference(qkv, offsets, p, 999, upstream)
        assert (other - out).abs().max().item() > 0.1


def test_a_fresh_key_per_call_from_torch_rng_replays_from_the_seed():
    qkv, offsets = segments()
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(ta.attention(qkv, offsets, max(LENGTHS), 0.1))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_keep_bits_are_bernoulli_and_independent():
    p = 0.1
    rows = torch.arange(1000, 1512, dtype=torch.int64)
    cols = torch.arange(512, dtype=torch.int64)
    masks = [ta.keep_mask(7, h, rows, cols, p).float() for h in range(4)]
    m = masks[0]
    n = m.numel()
    assert abs(m.mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5  # keep rate, 4 sigma
    bound = 4 / n**0.5  # correlations of independent bits stay within ~4 / sqrt(n)

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return (a * b).mean().item() / (a.std() * b.std()).item()

    assert abs(corr(m[:, 1:], m[:, :-1])) < bound * 1.5  # neighbouring keys
    assert abs(corr(m[1:], m[:-1])) < bound * 1.5  # neighbouring queries
    assert abs(corr(masks[0], masks[1])) < bound  # heads
    assert abs(corr(m, ta.keep_mask(8, 0, rows, cols, p).float())) < bound  # keys
    # The row and column hashes are xor-ed before the per-score mix: no 2 x 2 rectangle structure
    # (with one multiply only, the statistic sat ~3 standard errors low over 40 keys: NOTES stop 15).
    s = 2 * m - 1
    rect = (s[:-1, :-1] * s[1:, :-1] * s[:-1, 1:] * s[1:, 1:]).mean().item()
    assert abs(rect - (1 - 2 * p) ** 4) < 6 / n**0.5


def test_the_packed_model_step_matches_the_sdpa_block_mask_path():
    """A tiny model in fp16 with dropout off: the triton kernel (padded segments and padding-free
    layers) gives the loss and gradients of the same segments through SDPA's block mask."""
    cfg = model_config("tiny", vocab_size=V, dropout=0.0, attention_dropout=0.0)
    ids = batch([20, 9, 3, 20], T=20)
    pos, lab = mlm_targets(ids, K=4)
    index = torch.from_numpy(unpad_index(ids.numpy() == PAD)).to(DEV)
    ids = ids.to(DEV)
    results = {}
    for name, kernel, unpad in (("sdpa", "sdpa", False), ("triton", "triton", False),
                                ("triton-unpad", "triton", True)):
        torch.manual_seed(0)
        model = RobertaMLM(dataclasses.replace(cfg, attention_kernel=kernel, unpad=unpad))
        model.to(DEV, torch.float16)
        loss = model(ids, pos.to(DEV), lab.to(DEV), unpad_index=index if unpad else None)
        loss.backward()
        grad = torch.cat([q.grad.float().flatten() for q in model.parameters() if q.grad is not None])
        results[name] = (loss.float().item(), grad)
    ref_loss, ref_grad = results["sdpa"]
    for name in ("triton", "triton-unpad"):
        loss, grad = results[name]
        assert abs(loss - ref_loss) < 2e-3 * abs(ref_loss), name
        assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0).item() > 0.999, name


def test_compiled_whole_with_no_graph_break():
    """The custom ops trace into one graph. With a given key the compiled step is the eager one; with
    a drawn key (compiled code draws it from inductor's generator, as a compiled nn.Dropout would) it
    replays from the seed."""
    qkv, offsets = segments()
    key = torch.tensor(5, dtype=torch.int32, device=DEV)

    def step(x, key=None):
        return ta.attention(x, offsets, max(LENGTHS), 0.2, key).float().square().sum()

    compiled = torch.compile(step, fullgraph=True)
    grads = []
    for fn, k, seed in ((compiled, key, 0), (step, key, 0), (compiled, None, 3), (compiled, None, 3)):
        x = qkv.detach().clone().requires_grad_()
        torch.manual_seed(seed)
        fn(x, k).backward()
        grads.append(x.grad.float())
    close(grads[0], grads[1], torch.float16)
    assert torch.equal(grads[2], grads[3])
    assert not torch.equal(grads[2], grads[0])


def test_attend_routes_the_triton_kernel_and_falls_back_to_sdpa_where_it_cannot_run():
    keep = batch([6, 3], T=6).ne(PAD)
    qkv = torch.randn(2, 6, 3, 2, 16)
    inputs = attention.attention_inputs(keep, "triton")
    assert inputs.mask.dtype == torch.int32  # segment offsets, as for varlen
    # fp32 cannot run the kernel: the SDPA block-mask path, equal to varlen's fallback
    fallback = attention.attend(qkv, inputs, 0.0)
    varlen = attention.attend(qkv, attention.attention_inputs(keep, "varlen"), 0.0)
    assert torch.equal(fallback, varlen)
    half = qkv.to(DEV, torch.float16)
    assert ta.runs_on(half)
    ours = attention.attend(half, attention.attention_inputs(keep.to(DEV), "triton"), 0.0)
    close(ours.float().cpu() * keep[..., None], varlen * keep[..., None], torch.float16)


def test_bad_inputs_name_the_problem():
    qkv, offsets = segments(d=32)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        ta.attention(qkv[..., :24], offsets, 40, 0.0)
    with pytest.raises(ValueError, match="int32"):
        ta.attention(qkv, offsets.long(), 40, 0.0)
    with pytest.raises(ValueError, match="attention dropout"):
        ta.dropout_args(1.0)


def test_config_accepts_triton_with_padding_free_layers_and_the_trainer_requires_triton_on_cuda(
        monkeypatch):
    cfg = model_config("tiny", attention_kernel="triton", unpad=True)
    with pytest.raises(ConfigError, match="model.attention_kernel.*power of two"):
        model_config("tiny", attention_kernel="triton", num_heads=4, hidden_size=96)
    assert resolve_auto(model_config("tiny", attention_kernel="triton"), True).unpad is True
    assert resolve_auto(model_config("tiny", attention_kernel="triton"), False).unpad is False
    ta.check_available(cfg, cuda=True)  # triton is installed here
    monkeypatch.setattr(ta, "triton", None)
    ta.check_available(cfg, cuda=False)  # the CPU falls back to SDPA: nothing needed
    with pytest.raises(ConfigError, match="model.attention_kernel=triton needs the triton package"):
        ta.check_available(cfg, cuda=True)


cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@cuda_only
def test_matches_flash_attention_2_at_roberta_shapes(monkeypatch):
    """bf16, 12 heads of 64, rows of 512 and shorter: our kernel and FlashAttention-2's varlen kernel
    against the fp32 specification, without dropout (their keep bits differ by design)."""
    lengths = (512, 512, 77, 512, 300, 1)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    qkv = torch.randn(int(offsets[-1]), 3, 12, 64, generator=torch.Generator().manual_seed(0))
    qkv = qkv.to(DEV, torch.bfloat16)
    upstream = torch.randn(qkv.shape[0], 12, 64, device=DEV)
    ref_out, ref_grad = run_reference(qkv, offsets, 0.0, 0, upstream)
    for name in ("split", "fused", "flash2"):
        x = qkv.detach().clone().requires_grad_()
        if name != "flash2":
            monkeypatch.setenv("ROBERTA_DS_TRITON_ATTN_BWD", name)
            out = ta.attention(x, offsets, 512, 0.0)
        else:
            q, k, v = x.unbind(1)
            out = attention.flash_varlen(q, k, v, offsets, 512, 0.0)
        out.backward(upstream.to(out.dtype))
        close(out.float(), ref_out, torch.bfloat16)
        close(x.grad.float(), ref_grad, torch.bfloat16)


@cuda_only
def test_compiled_padding_free_model_with_the_triton_kernel_in_one_graph():
    """The training shape of the kernel: compiled, bf16 autocast, padding-free layers with a token count
    that changes every batch (dynamic), dropout on; the loss matches SDPA's key mask in eval mode."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    cfg = model_config("tiny", vocab_size=V, attention_kernel="triton", unpad=True)
    model = RobertaMLM(cfg).to(DEV)
    ref = RobertaMLM(dataclasses.replace(cfg, attention_kernel="sdpa", unpad=False)).to(DEV).eval()
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model)
    for seed, lengths in enumerate(([64, 40, 17, 64], [9, 64, 33, 3], [64, 64, 64, 64])):
        ids = batch(lengths, T=64, seed=seed)
        pos, lab = mlm_targets(ids, K=8, seed=seed)
        index = torch.from_numpy(unpad_index(ids.numpy() == PAD)).to(DEV)
        torch._dynamo.maybe_mark_dynamic(index, 0)
        ids, pos, lab = (t.to(DEV) for t in (ids, pos, lab))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.eval()
            loss = compiled(ids, pos, lab, unpad_index=index)
            want = ref(ids, pos, lab)
            torch.testing.assert_close(loss.float(), want.float(), rtol=2e-2, atol=2e-2)
            model.train()
            train_loss = compiled(ids, pos, lab, unpad_index=index)
        assert torch.isfinite(train_loss)
        train_loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # one eval graph, one train graph
    torch._dynamo.reset()
