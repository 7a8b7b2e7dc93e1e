"""RobertaMLM: shapes, padding invariance, masked-only loss = full-head loss, dropout, init, compile."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model

from roberta_ds.config import PRESETS, model_config
from roberta_ds.errors import ConfigError
from roberta_ds.model.model import IGNORE_INDEX, RobertaMLM, position_ids

V = 120
PAD = 1


def make_model(seed: int = 0, **overrides) -> RobertaMLM:
    return tiny_model(V, seed=seed, **overrides)


def batch(lengths: list[int], T: int, seed: int = 0) -> torch.Tensor:
    """Right-padded rows: <s>=0, random body, </s>=2, then padding (id 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), T), PAD, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(4, V, (n,), generator=g)
        ids[r, 0], ids[r, n - 1] = 0, 2
    return ids


def mlm_targets(ids: torch.Tensor, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to K distinct real positions per row with their labels; unused entries -> (0, -100)."""
    g = torch.Generator().manual_seed(seed)
    B = ids.shape[0]
    pos = torch.zeros(B, K, dtype=torch.long)
    lab = torch.full((B, K), IGNORE_INDEX, dtype=torch.long)
    for r in range(B):
        real = int(ids[r].ne(PAD).sum())
        take = torch.randperm(real - 2, generator=g)[: min(K, real - 2)] + 1
        pos[r, : len(take)] = take
        lab[r, : len(take)] = torch.randint(4, V, (len(take),), generator=g)
    return pos, lab


def test_shapes_and_parameter_names():
    model = make_model()
    ids = batch([16, 9], T=16)
    pos, lab = mlm_targets(ids, K=4)
    loss = model(ids, pos, lab)
    assert loss.shape == () and torch.isfinite(loss)
    assert model.logits(ids).shape == (2, 16, V)
    names = dict(model.named_parameters())
    assert names["layers.1.attn.qkv.weight"].shape == (3 * 64, 64)  # fused QKV
    assert "head.decoder.weight" not in model.state_dict()  # the decoder IS the word embedding
    assert not any("decoder" in n for n in names)


def test_positions_match_hf_rule():
    ids = torch.tensor([[0, 5, 6, 2, PAD, PAD], [0, 7, 2, PAD, PAD, PAD]])
    assert position_ids(ids, PAD).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]]


def test_padding_does_not_change_real_token_logits():
    model = make_model().eval()
    short = batch([12, 7], T=12)
    padded = torch.full((3, 40), PAD, dtype=torch.long)
    padded[:2, :12] = short
    padded[2] = batch([40], T=40, seed=5)[0]  # a full-length neighbour
    with torch.no_grad():
        a = model.logits(short)
        b = model.logits(padded)[:2, :12]
    real = short.ne(PAD)
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-5)


def test_masked_only_loss_equals_full_head_loss():
    model = make_model().eval()
    ids = batch([30, 17, 9], T=30)
    pos, lab = mlm_targets(ids, K=6)
    with torch.no_grad():
        fast = model(ids, pos, lab)
        full = model.logits(ids)  # (B, T, V)
    dense = torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long)
    dense.scatter_(1, pos, lab)  # unused entries write -100 at position 0, which holds no label
    ref = F.cross_entropy(full.reshape(-1, V), dense.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)


def test_correct_count_is_the_full_heads_top1_hits():
    """count_correct: how many labelled entries the full head's argmax gets right (ignored ones never count)."""
    model = make_model().eval()
    ids = batch([30, 17, 9], T=30)
    pos, lab = mlm_targets(ids, K=6)
    with torch.no_grad():
        full = model.logits(ids)
        top1 = full.argmax(-1).gather(1, pos)  # (B, K) the prediction at each slot
        lab[0, :3] = top1[0, :3]  # some labels the model gets right, the rest (random ids) mostly wrong
        lab[2, -1] = IGNORE_INDEX  # an unused slot: never counted
        loss, correct = model(ids, pos, lab, count_correct=True)
    expected = int(((top1 == lab) & lab.ne(IGNORE_INDEX)).sum())
    assert correct.dtype == torch.int64 and int(correct) == expected >= 3
    torch.testing.assert_close(loss, model(ids, pos, lab))


def test_gradients_of_masked_only_loss_equal_full_head_loss():
    model = make_model().eval()
    ids = batch([20, 11], T=20)
    pos, lab = mlm_targets(ids, K=5)
    model(ids, pos, lab).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    dense = torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long).scatter_(1, pos, lab)
    F.cross_entropy(model.logits(ids).reshape(-1, V), dense.reshape(-1)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_all_ignored_labels_give_zero_loss_and_zero_grad():
    model = make_model()
    ids = batch([10, 6], T=10)
    pos = torch.zeros(2, 3, dtype=torch.long)
    lab = torch.full((2, 3), IGNORE_INDEX, dtype=torch.long)
    loss = model(ids, pos, lab)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_fully_padded_row_keeps_gradients_finite():
    model = make_model()
    ids = batch([10, 6], T=10)
    ids[1] = PAD  # a row with no real token at all
    pos, lab = mlm_targets(ids[:1], K=3)
    pos = torch.cat([pos, torch.zeros_like(pos)])
    lab = torch.cat([lab, torch.full_like(lab, IGNORE_INDEX)])
    loss = model(ids, pos, lab)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_dropout_only_in_train_mode():
    model = make_model()
    ids = batch([16, 16], T=16)
    pos, lab = mlm_targets(ids, K=4)
    model.train()
    assert model(ids, pos, lab).item() != model(ids, pos, lab).item()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, pos, lab), model(ids, pos, lab))
        assert torch.equal(model.logits(ids), model.logits(ids))


def test_no_padding_path_matches_masked_path():
    model = make_model().eval()
    ids = batch([16, 16], T=16)
    pos, lab = mlm_targets(ids, K=4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pos, lab, has_padding=False), model(ids, pos, lab))


def test_init_is_deterministic_and_roberta_like():
    a, b, c = make_model(0), make_model(0), make_model(1)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.embeddings.word.weight, c.embeddings.word.weight)
    big = RobertaMLM(model_config("tiny", vocab_size=5000, hidden_size=256, num_heads=4, ffn_size=1024))
    sd = big.state_dict()
    assert abs(float(sd["layers.0.ffn.fc.weight"].std()) - 0.02) < 1e-3
    assert abs(float(sd["embeddings.word.weight"].std()) - 0.02) < 1e-3
    assert not sd["embeddings.word.weight"][PAD].any() and not sd["embeddings.position.weight"][PAD].any()
    for name, t in sd.items():
        if name.endswith("norm.weight"):
            assert torch.equal(t, torch.ones_like(t)), name
        elif name.endswith("bias"):
            assert not t.any(), name


def test_activation_checkpointing_gives_same_loss_and_grads():
    ids = batch([16, 12], T=16)
    pos, lab = mlm_targets(ids, K=4)
    results = []
    for ckpt in (False, True):
        model = make_model(activation_checkpointing=ckpt).train()
        torch.manual_seed(7)  # same dropout masks; checkpoint replays the RNG state on recompute
        loss = model(ids, pos, lab)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for n, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][n], msg=n)


@pytest.mark.parametrize("kernel", ["sdpa", "varlen"])
def test_compiles_as_one_graph(kernel):
    """fullgraph=True fails on any graph break: `.item()`, nonzero(), data-dependent branches."""
    torch._dynamo.reset()
    model = make_model(attention_kernel=kernel).eval()
    ids = batch([16, 11], T=16)
    pos, lab = mlm_targets(ids, K=4)
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(ids, pos, lab), model(ids, pos, lab))
    torch._dynamo.reset()


def test_too_long_input_is_refused():
    model = make_model()
    T = model.cfg.max_seq_len + 1
    with pytest.raises(ConfigError, match="max_positions"):
        model.logits(torch.zeros(1, T, dtype=torch.long))


@pytest.mark.parametrize("preset", ["roberta-base", "roberta-large"])
def test_presets_match_hf_parameter_count(preset):
    transformers = pytest.importorskip("transformers")
    from roberta_ds.hf.names import hf_config

    cfg = PRESETS[preset]
    with torch.device("meta"):
        ours = RobertaMLM(cfg)
        hf = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**hf_config(cfg)))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in hf.parameters())
    assert count == {"roberta-base": 124_697_433, "roberta-large": 355_412_057}[preset]
    assert dataclasses.replace(cfg, num_layers=3).num_layers == 3  # any field overridable
