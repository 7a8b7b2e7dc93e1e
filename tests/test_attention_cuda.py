"""The "varlen" attention kernel on a CUDA GPU (every test skips without CUDA): FlashAttention-2's
varlen kernel against SDPA's key mask, its dropout (unbiased, replayed in backward), full rows (empty
padding segments), and the compiled model without recompiles. CPU tests (test_attention.py) check the
same semantics through SDPA and the kernel call against the op's schema on meta tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model import PAD, batch, mlm_targets

from roberta_ds.config import model_config
from roberta_ds.data.masking import unpad_index
from roberta_ds.model import attention
from roberta_ds.model.model import RobertaMLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"


def inputs(dtype: torch.dtype, lengths=(64, 37, 1, 64, 50), t: int = 64, h: int = 4, d: int = 64):
    """qkv (B, T, 3, h, d) on the GPU and the (B, T) real-token flags: partial rows, a full row (empty
    padding segment) and a row holding only <s>."""
    g = torch.Generator().manual_seed(0)
    keep = batch(list(lengths), T=t).ne(PAD).to(DEV)
    qkv = torch.randn(len(lengths), t, 3, h, d, generator=g).to(DEV, dtype)
    return qkv, keep


def both(qkv: torch.Tensor, keep: torch.Tensor, p: float = 0.0, seed: int = 0):
    """(output, qkv grad) of the varlen kernel and of SDPA's key mask, upstream gradient zero at padding
    (as in the model, where padding never reaches the loss)."""
    out = []
    for kernel in ("varlen", "sdpa"):
        x = qkv.detach().clone().requires_grad_()
        torch.manual_seed(seed)
        y = attention.attend(x, attention.attention_inputs(keep, kernel), p)
        upstream = torch.ones_like(y) * keep[..., None]
        (y * upstream).sum().backward()
        out.append((y.detach(), x.grad))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_varlen_equals_key_mask_at_real_positions(dtype):
    qkv, keep = inputs(dtype)
    assert attention.use_flash(qkv)
    (y, gx), (y_ref, gx_ref) = both(qkv, keep)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y[keep].float(), y_ref[keep].float(), rtol=tol, atol=tol)
    torch.testing.assert_close(gx[keep].float(), gx_ref[keep].float(), rtol=tol, atol=tol)
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()


def test_flash_varlen_dropout_is_unbiased_and_replayed_in_backward():
    qkv, keep = inputs(torch.float16)
    (y0, _), _ = both(qkv, keep)
    mean = torch.stack([both(qkv, keep, p=0.1, seed=s)[0][0].float() for s in range(400)]).mean(0)
    # Unbiased: the average over 400 dropout draws approaches the dropout-free output.
    err = (mean[keep] - y0[keep].float()).abs().mean() / y0[keep].float().abs().mean()
    assert err < 0.05, err
    # Replayed: with one seed, y = P_drop V is linear in V, so <g, y(V + E) - y(V)> = <dL/dV, E>.
    x = qkv.detach().clone().requires_grad_()
    attn = attention.attention_inputs(keep, "varlen")
    b, t, _, h, d = qkv.shape
    g = torch.randn(b, t, h * d, device=DEV, dtype=qkv.dtype) * keep[..., None]
    torch.manual_seed(5)
    y = attention.attend(x, attn, 0.1)
    (y * g).sum().backward()
    e = torch.zeros_like(qkv)
    e[:, :, 2] = torch.randn_like(qkv[:, :, 2]) * 0.1
    torch.manual_seed(5)
    y2 = attention.attend(qkv + e, attn, 0.1)
    lhs = (g.float() * (y2.float() - y.detach().float())).sum()
    rhs = (x.grad.float() * e.float()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=2e-2, atol=1e-2)


def test_compiled_model_varlen_matches_sdpa_without_recompiles():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = model_config("tiny", vocab_size=120, attention_kernel="varlen")
    torch.manual_seed(0)
    varlen = RobertaMLM(cfg).to(DEV).eval()
    ref = RobertaMLM(model_config("tiny", vocab_size=120, attention_kernel="sdpa")).to(DEV).eval()
    ref.load_state_dict(varlen.state_dict())
    compiled = torch.compile(varlen, fullgraph=True, dynamic=False)
    for seed in range(3):  # new lengths every call, same shapes: one graph
        ids = batch([64, 40, 17, 64], T=64, seed=seed)
        pos, lab = mlm_targets(ids, K=8, seed=seed)
        ids, pos, lab = (t.to(DEV) for t in (ids, pos, lab))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(ids, pos, lab)
            want = ref(ids, pos, lab)
        torch.testing.assert_close(loss.float(), want.float(), rtol=2e-2, atol=2e-2)
        loss.backward()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1, frames
    torch._dynamo.reset()


def test_compiled_unpadded_model_matches_sdpa_with_one_graph():
    """Padding-free layers under inductor: N changes every batch, marked dynamic, one graph."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    unpadded = RobertaMLM(model_config("tiny", vocab_size=120, attention_kernel="varlen", unpad=True)).to(DEV)
    ref = RobertaMLM(model_config("tiny", vocab_size=120, attention_kernel="sdpa")).to(DEV).eval()
    ref.load_state_dict(unpadded.state_dict())
    compiled = torch.compile(unpadded.eval())
    for seed, lengths in enumerate(([64, 40, 17, 64], [9, 64, 33, 2], [64, 64, 64, 64])):
        ids = batch(lengths, T=64, seed=seed)
        pos, lab = mlm_targets(ids, K=8, seed=seed)
        index = torch.from_numpy(unpad_index(ids.numpy() == PAD)).to(DEV)
        torch._dynamo.maybe_mark_dynamic(index, 0)
        ids, pos, lab = (t.to(DEV) for t in (ids, pos, lab))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(ids, pos, lab, unpad_index=index)
            want = ref(ids, pos, lab)
        torch.testing.assert_close(loss.float(), want.float(), rtol=2e-2, atol=2e-2)
        loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_model_check_passes_on_the_gpu():
    """bench/model_check.py's varlen parity (loss, gradient cosine) at roberta-base width, micro 4."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(repo / "bench" / "model_check.py"), "--micro", "4", "--iters", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "flash-varlen" in proc.stdout


def test_fp32_falls_back_to_sdpa_with_the_block_mask():
    qkv, keep = inputs(torch.float32)
    assert not attention.use_flash(qkv)
    y = attention.attend(qkv, attention.attention_inputs(keep, "varlen"), 0.0)
    ref = F.scaled_dot_product_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0),
                                         attn_mask=attention.key_mask(keep)).transpose(1, 2).flatten(2)
    torch.testing.assert_close(y[keep], ref[keep])
