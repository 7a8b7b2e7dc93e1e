"""The "varlen" attention kernel: segment offsets, the same loss and gradients as the key mask, the
FlashAttention-2 call checked against the op's schema on meta tensors, and the right-padding guard."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_model import PAD, V, batch, make_model, mlm_targets

from roberta_ds.config import model_config, resolve_auto
from roberta_ds.data.masking import check_right_padded, unpad_index
from roberta_ds.engine.validation import model_inputs
from roberta_ds.errors import ConfigError, ShardFormatError
from roberta_ds.model import attention
from roberta_ds.model import model as model_module
from roberta_ds.model.model import RobertaMLM


def test_segment_offsets_alternate_real_and_padding():
    ids = batch([10, 16, 1, 7], T=16)  # partial, full, only <s>, partial
    offsets = attention.segment_offsets(ids.ne(PAD))
    assert offsets.dtype == torch.int32 and offsets.is_contiguous()
    assert offsets.tolist() == [0, 10, 16, 32, 32, 33, 48, 55, 64]  # the full row's padding is empty


def test_segment_mask_agrees_with_key_mask_for_real_queries():
    keep = batch([10, 16, 3], T=16).ne(PAD)
    seg = attention.segment_mask(attention.segment_offsets(keep), 3, 16)  # (B, 1, T, T)
    key = attention.key_mask(keep).expand(-1, -1, 16, -1)
    real = keep[:, None, :, None].expand_as(seg)
    assert torch.equal(seg[real], key[real])
    # Padding queries see padding keys only (never a real token), so nothing flows back into real rows.
    pad_q = ~keep[:, None, :, None] & seg
    assert not (pad_q & keep[:, None, None, :]).any()


def run(kernel: str, ids: torch.Tensor, train: bool, **overrides):
    model = make_model(attention_kernel=kernel, **overrides).train(train)
    pos, lab = mlm_targets(ids, K=4)
    torch.manual_seed(3)  # the same dropout draws for both kernels
    loss = model(ids, pos, lab)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-dropout"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointing"])
def test_varlen_gives_the_key_masks_loss_and_gradients(train, ckpt):
    """Exact on CPU: the segments' block mask selects the same keys for every real query, and dropout
    draws over the same (B, heads, T, T) shape."""
    ids = batch([16, 11, 5, 16], T=16)
    ref_loss, ref_grads = run("sdpa", ids, train, activation_checkpointing=ckpt)
    loss, grads = run("varlen", ids, train, activation_checkpointing=ckpt)
    assert torch.equal(loss, ref_loss)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=0, atol=0, msg=n)


def test_attend_varlen_equals_key_mask_and_not_unmasked():
    """At the kernel: real positions get the key mask's output, which attending over padding would
    change (so the model-level checks above can fail)."""
    torch.manual_seed(0)
    keep = batch([16, 9, 4], T=16).ne(PAD)
    qkv = torch.randn(3, 16, 3, 2, 8)
    varlen = attention.attend(qkv, attention.attention_inputs(keep, "varlen"), 0.0)
    masked = attention.attend(qkv, attention.attention_inputs(keep, "sdpa"), 0.0)
    unmasked = attention.attend(qkv, attention.attention_inputs(None, "sdpa"), 0.0)
    torch.testing.assert_close(varlen[keep], masked[keep])
    assert (unmasked[keep] - masked[keep]).abs().max() > 0.1


def test_logits_use_the_key_mask_whatever_the_training_kernel():
    """Inference takes any attention mask (left padding too), which segments cannot express."""
    ids = batch([16, 9], T=16).flip(1)  # left-padded
    a = make_model(attention_kernel="sdpa").eval()
    b = make_model(attention_kernel="varlen").eval()
    with torch.no_grad():
        torch.testing.assert_close(b.logits(ids), a.logits(ids), rtol=0, atol=0)


def test_flash_call_matches_the_ops_schema_and_backward(monkeypatch):
    """The CUDA branch (reshape, `aten._flash_attention_forward`, its autograd backward) run on meta
    tensors: argument order, shapes and the backward formula are checked without a GPU."""
    b, t, h, d = 3, 16, 4, 16
    qkv = torch.empty(b, t, 3, h, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    offsets = torch.empty(2 * b + 1, device="meta", dtype=torch.int32)
    monkeypatch.setattr(attention, "use_flash", lambda q: q.device.type == "meta")
    y = attention.attend(qkv, attention.AttentionInputs("varlen", offsets), 0.1)
    assert y.shape == (b, t, h * d) and y.dtype == torch.bfloat16
    y.sum().backward()
    assert qkv.grad.shape == qkv.shape


def test_use_flash_only_for_cuda_half_precision():
    assert not attention.use_flash(torch.zeros(2, 2, dtype=torch.bfloat16))
    assert not attention.use_flash(torch.zeros(2, 2, device="meta", dtype=torch.bfloat16))


def test_the_removed_triton_kernel_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="model.attention_kernel.*'triton' was removed.*choose 'varlen'"):
        model_config("tiny", vocab_size=V, attention_kernel="triton")


def test_unknown_kernel_is_refused():
    with pytest.raises(ConfigError, match="model.attention_kernel"):
        model_config("tiny", vocab_size=V, attention_kernel="flash")


def test_right_padding_guard():
    rows = batch([16, 9, 1], T=16).numpy()
    is_pad = check_right_padded(rows, PAD, np.array([5, 6, 7]))
    assert is_pad.sum() == 7 + 15
    rows[1, 3] = PAD  # the pad id inside the text of sample 6
    with pytest.raises(ShardFormatError, match=r"sample 6 .* position 3"):
        check_right_padded(rows, PAD, np.array([5, 6, 7]))


# ----------------------------------------------------------------------------------------------
# Padding-free layers (model.unpad): the real tokens packed into one sequence


def padded_batch():
    """Rows of every kind: full, partial, only <s> ... </s>, and one of padding only."""
    ids = batch([16, 11, 2, 16, 5], T=16)
    ids[3] = PAD
    pos, lab = mlm_targets(ids[[0, 1, 2, 4]], K=4)
    pos = torch.cat([pos[:3], torch.zeros(1, 4, dtype=torch.long), pos[3:]])
    lab = torch.cat([lab[:3], torch.full((1, 4), -100), lab[3:]])
    return ids, pos, lab, torch.from_numpy(unpad_index(ids.numpy() == PAD))


def test_loader_index_is_the_models_real_tokens():
    ids, _, _, index = padded_batch()
    keep = attention.real_tokens(ids, PAD)
    assert torch.equal(index, keep.flatten().nonzero().squeeze(1))
    assert keep[3].sum() == 1  # the padding-only row keeps position 0, as the key mask does
    assert attention.packed_offsets(keep).tolist() == [0, 16, 27, 29, 30, 35]


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointing"])
def test_unpadded_gives_the_padded_loss_and_gradients(ckpt):
    """Eval mode (dropout draws depend on the layout's shape); equal up to summation order."""
    ids, pos, lab, index = padded_batch()
    out = {}
    kernels = {"sdpa": {"attention_kernel": "sdpa"}, "unpad": {"attention_kernel": "varlen", "unpad": True}}
    for name, kw in kernels.items():
        model = make_model(activation_checkpointing=ckpt, **kw).eval()
        loss = model(ids, pos, lab, unpad_index=index)
        loss.backward()
        out[name] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(out["unpad"][0], out["sdpa"][0], rtol=1e-6, atol=0)
    for n, g in out["sdpa"][1].items():
        torch.testing.assert_close(out["unpad"][1][n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_unpadded_path_uses_the_index():
    """The check above can fail: a different index (here dropping a real token) changes the loss;
    without an index the padded layout runs."""
    ids, pos, lab, index = padded_batch()
    model = make_model(attention_kernel="varlen", unpad=True).eval()
    with torch.no_grad():
        right = model(ids, pos, lab, unpad_index=index)
        assert torch.equal(model(ids, pos, lab), make_model(attention_kernel="varlen").eval()(ids, pos, lab))
        wrong = index.clone()
        wrong[5] = 15 + 16  # row 1's 6th real token swapped for a padding position
        assert not torch.allclose(model(ids, pos, lab, unpad_index=wrong), right)


def test_unpadded_compiles_once_for_every_length():
    """N changes every batch; marked dynamic, it is one graph (no recompile per length)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = make_model(attention_kernel="varlen", unpad=True).train()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for lengths in ([16, 11], [9, 3], [16, 16], [5, 14]):
        ids = batch(lengths, T=16)
        pos, lab = mlm_targets(ids, K=4)
        index = torch.from_numpy(unpad_index(ids.numpy() == PAD))
        torch._dynamo.maybe_mark_dynamic(index, 0)
        loss = compiled(ids, pos, lab, unpad_index=index)
        loss.backward()
        assert torch.isfinite(loss)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_packed_flash_call_on_meta(monkeypatch):
    """The packed layout's CUDA branch: one (1, N) sequence, B + 1 offsets, max_len T (meta tensors)."""
    n, h, d = 37, 4, 16
    qkv = torch.empty(1, n, 3, h, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    offsets = torch.empty(4, device="meta", dtype=torch.int32)
    monkeypatch.setattr(attention, "use_flash", lambda q: q.device.type == "meta")
    y = attention.attend(qkv, attention.AttentionInputs("varlen", offsets, max_len=16), 0.1)
    assert y.shape == (1, n, h * d)
    y.sum().backward()
    assert qkv.grad.shape == qkv.shape


def test_unpad_needs_varlen():
    with pytest.raises(ConfigError, match="model.unpad"):
        model_config("tiny", vocab_size=V, unpad=True)
    with pytest.raises(ConfigError, match="model.unpad"):  # "auto" does not stand in for varlen
        model_config("tiny", vocab_size=V, attention_kernel="auto", unpad=True)
    with pytest.raises(ConfigError, match=r"model.unpad: must be true, false or \"auto\", got 'maybe'"):
        model_config("tiny", vocab_size=V, attention_kernel="varlen", unpad="maybe")
    # YAML's boolean words are booleans (config_types.py).
    assert model_config("tiny", vocab_size=V, attention_kernel="varlen", unpad="yes").unpad is True


# ----------------------------------------------------------------------------------------------
# "auto" (the default): varlen + padding-free layers where the varlen kernel runs, sdpa elsewhere


@pytest.mark.parametrize(("kernel", "unpad", "flash", "want"), [
    ("auto", "auto", True, ("varlen", True)),
    ("auto", "auto", False, ("sdpa", False)),
    ("auto", False, True, ("varlen", False)),
    ("sdpa", "auto", True, ("sdpa", False)),
    ("varlen", "auto", False, ("varlen", False)),  # CPU/fp32 varlen: SDPA segments, never an N x N mask
    ("varlen", True, False, ("varlen", True)),  # asked for: kept
])
def test_resolve_auto(kernel, unpad, flash, want):
    cfg = model_config("tiny", vocab_size=V, attention_kernel=kernel, unpad=unpad)
    got = resolve_auto(cfg, flash)
    assert (got.attention_kernel, got.unpad) == want
    assert dataclasses.replace(got, attention_kernel=kernel, unpad=unpad) == cfg  # nothing else changed


def test_defaults_are_auto():
    cfg = model_config("roberta-base")
    assert (cfg.attention_kernel, cfg.unpad) == ("auto", "auto")


def test_the_model_decides_nothing_per_call(monkeypatch):
    """An "auto" config builds the portable model (sdpa, padded rows: it ignores an unpad_index); the
    run's decision for a GPU in 16 bits (resolve_auto(cfg, flash=True), made once by the trainer) builds
    the padding-free varlen model, whatever device the call runs on (on the CPU the varlen branch runs
    SDPA over the segments)."""
    ids, pos, lab, index = padded_batch()
    model = make_model().eval()
    assert (model.cfg.attention_kernel, model.cfg.unpad) == ("sdpa", False)
    with torch.no_grad():
        ref = make_model(attention_kernel="sdpa").eval()(ids, pos, lab)
    seen = []
    real = attention.attention_inputs
    monkeypatch.setattr(model_module, "attention_inputs",
                        lambda keep, kernel: seen.append(kernel) or real(keep, kernel))
    with torch.no_grad():
        assert torch.equal(model(ids, pos, lab, unpad_index=index), ref)
    assert seen == ["sdpa"]
    decided = RobertaMLM(resolve_auto(model_config("tiny", vocab_size=V), flash=True)).eval()
    decided.load_state_dict(model.state_dict())
    assert (decided.cfg.attention_kernel, decided.cfg.unpad) == ("varlen", True)
    packed = []
    monkeypatch.setattr(model_module, "packed_inputs",
                        lambda keep: packed.append(attention.packed_inputs(keep)) or packed[-1])
    with torch.no_grad():
        got = decided(ids, pos, lab, unpad_index=index)
    assert [p.kernel for p in packed] == ["varlen"]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_loop_passes_the_index_only_when_unpadded():
    ids, pos, lab, index = padded_batch()
    b = {"input_ids": ids, "mlm_positions": pos, "mlm_labels": lab, "unpad_index": index}
    args, kwargs = model_inputs(b, torch.device("cpu"), unpad=False)
    assert len(args) == 3 and kwargs == {}
    args, kwargs = model_inputs(b, torch.device("cpu"), unpad=True)
    assert torch.equal(kwargs["unpad_index"], index)
