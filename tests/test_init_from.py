"""Continued pretraining: `import-hf`, then `--set init_from=`. The README's recipe runs end to end on a
tiny Hugging Face model made here with transformers, and the first step's loss is transformers' own MLM
loss on the batch the trainer used (dumped by the `dump@batch` fault, mask included). Weights that do
not fit the run (a shape, a vocabulary of another size or of another tokenizer, a config field that
changes the maths) are refused before any step, naming the tensor or field and both values.

Cost: one 2-rank launch (the README recipe, 2 steps) and one 1-rank launch that is refused at setup.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import free_port, run_trainer, tiny_args
from readme_blocks import TRAIN_CONFIG_SCALING, readme_block, run_bash, scaled, scaled_ds_configs, user_env

from roberta_ds.config import PRESETS, ModelConfig
from roberta_ds.data.tokenizer import load_tokenizer_info
from roberta_ds.errors import ConfigError
from roberta_ds.hf.init_check import load_init
from roberta_ds.model.model import RobertaMLM

TINY = PRESETS["tiny"]
LOSS_TOLERANCE = 2e-4
"""fp32 on both sides, different kernels (our fused QKV and SDPA, transformers' separate projections):
import-hf bounds the logits' difference by 1e-4 (its check), and a log-softmax moves by at most twice
its inputs' largest change, so the mean cross-entropy by at most 2e-4."""


def save_tiny_hf(out: Path, tokenizer: Path, *, vocab_size: int | None = None, **config: object) -> Path:
    """A `RobertaForMaskedLM` of the tiny preset's shape saved by transformers, with `tokenizer`'s
    tokenizer.json beside it: what a Hugging Face model directory holds. `initializer_range` 0.2 (ten
    times RoBERTa's) gives logits far from uniform, so its loss is nothing a fresh model would give."""
    import transformers

    fields = dict(vocab_size=vocab_size or load_tokenizer_info(tokenizer).vocab_size,
                  hidden_size=TINY.hidden_size, num_hidden_layers=TINY.num_layers,
                  num_attention_heads=TINY.num_heads, intermediate_size=TINY.ffn_size,
                  max_position_embeddings=TINY.max_positions, type_vocab_size=1, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, initializer_range=0.2)
    fields.update(config)
    torch.manual_seed(0)
    model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**fields))
    model.save_pretrained(out)
    shutil.copy(tokenizer / "tokenizer.json", out / "tokenizer.json")
    return out


def hf_mlm_loss(hf_dir: Path, dump: Path) -> float:
    """transformers' RobertaForMaskedLM loss on one dumped micro-batch: its inputs, and labels at the
    masked positions only (the mean over them, as our loss)."""
    import transformers

    model = transformers.RobertaForMaskedLM.from_pretrained(str(hf_dir)).eval()
    b = np.load(dump)
    ids = torch.from_numpy(b["input_ids"])
    labels = torch.full_like(ids, -100)
    rows, slots = np.nonzero(b["mlm_labels"] != -100)
    labels[rows, b["mlm_positions"][rows, slots]] = torch.from_numpy(b["mlm_labels"][rows, slots])
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=(ids != 1).long(), labels=labels).loss)


# ----------------------------------------------------------------------------------------------
# The README recipe, end to end


@pytest.mark.slow
def test_continued_pretraining_recipe(tmp_path: Path, small_tokenizer: Path, builtin_corpus: Path) -> None:
    """Block `continued-pretraining` in a user's directory: `roberta-base/` is a tiny transformers model
    (with the suite's tokenizer), `domain/` a quarter of the built-in corpus, base.yaml the README's
    (tiny, fp32).
    Then: the adopted tokenizer is the model's byte for byte, and step 1's loss is transformers' loss on
    the 4 micro-batches (2 ranks x 2) of global batch 0, as the trainer dumped them."""
    work = tmp_path
    hf_dir = save_tiny_hf(work / "roberta-base", small_tokenizer)
    (work / "domain").mkdir()  # a quarter of the built-in corpus: ~90K tokens, ~1,400 blocks of 64
    (work / "domain" / "docs.jsonl").symlink_to(sorted(builtin_corpus.glob("*.jsonl"))[0])
    scaled_ds_configs(work / "ds_configs", fp32=True)  # bf16 would round the loss we compare
    (work / "base.yaml").write_text(scaled(readme_block("train-config").text, TRAIN_CONFIG_SCALING))
    dumps = work / "dumps"
    script = scaled(readme_block("continued-pretraining").text, [
        ("--workers 8", "--workers 2"),
        ("--num_gpus 8", f"--num_gpus 2 --master_port {free_port()}"),
        # dropout off, so the training forward is transformers' eval forward; 2 steps; a short evaluation
        ("--set optim.lr=1e-4", "--set optim.lr=1e-4 --set max_steps=2 --set model.dropout=0 "
         "--set model.attention_dropout=0 --set eval_batches=2"),
    ])
    env = user_env({"ROBERTA_DS_FAULTS": f"dump={dumps}@batch:step=0,times=2"})
    proc = run_bash(script, work, env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-6000:]

    assert (work / "tok" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    source = json.loads((work / "init" / "source.json").read_text())
    assert source["tokenizer_sha256"] == load_tokenizer_info(work / "tok").sha256
    assert "checked: max abs logit diff vs Hugging Face" in proc.stdout
    assert "initialised from init/: " in proc.stdout and "(tokenizer sha256 matches)" in proc.stdout

    metrics = (work / "runs" / "domain" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in metrics]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == [1, 2]
    files = sorted(dumps.glob("batch-step0-rank*.npz"))
    assert [f.name for f in files] == [f"batch-step0-rank{r}-{i}.npz" for r in (0, 1) for i in (0, 1)]
    expected = float(np.mean([hf_mlm_loss(hf_dir, f) for f in files]))
    print(f"step 1 loss {losses[1]:.6f}, transformers {expected:.6f}, diff {abs(losses[1] - expected):.2e}")
    assert losses[1] == pytest.approx(expected, abs=LOSS_TOLERANCE)
    # Not what a freshly initialised model gives (about ln V): the weights were loaded.
    assert abs(expected - np.log(load_tokenizer_info(work / "tok").vocab_size)) > 1.0


# ----------------------------------------------------------------------------------------------
# Refusals


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Path):
    """import-hf outputs of tiny transformers models: `fits` the tiny run, and three that do not."""
    from roberta_ds.hf.convert import import_hf

    root = tmp_path_factory.mktemp("imported")
    variants = {"fits": {}, "vocab": {"vocab_size": 2100}, "hidden": {"hidden_size": 32},
                "eps": {"layer_norm_eps": 1e-12}}
    out = {}
    for name, change in variants.items():
        hf = save_tiny_hf(root / f"hf-{name}", small_tokenizer, **change)
        import_hf(hf, root / name, verify=False, log=lambda m: None)
        out[name] = root / name
    return out


def _tiny_model(tokenizer: Path) -> tuple[RobertaMLM, ModelConfig, str]:
    info = load_tokenizer_info(tokenizer)
    cfg = ModelConfig(**{**TINY.__dict__, "vocab_size": info.vocab_size})
    return RobertaMLM(cfg), cfg, info.sha256


def test_fitting_weights_load_exactly(imported, small_tokenizer: Path) -> None:
    from roberta_ds.hf.convert import load_pretrained

    model, cfg, sha = _tiny_model(small_tokenizer)
    line = load_init(model, cfg, str(imported["fits"]), sha)
    assert "shapes and config match (tokenizer sha256 matches)" in line
    _, weights = load_pretrained(imported["fits"])
    state = model.state_dict()
    assert all(torch.equal(state[name], weights[name]) for name in weights)


def test_vocabulary_of_another_size_is_refused_naming_tensor_shapes_and_fix(imported, small_tokenizer: Path
                                                                             ) -> None:
    model, cfg, sha = _tiny_model(small_tokenizer)
    with pytest.raises(ConfigError) as e:
        load_init(model, cfg, str(imported["vocab"]), sha)
    msg = str(e.value)
    assert "embeddings.word.weight: weights (2100, 64) vs model (2048, 64)" in msg
    assert "head.bias: weights (2100,) vs model (2048,)" in msg
    assert "vocabulary of 2100 ids, the run's model 2048" in msg
    assert "roberta-ds tokenizer --out tok/ --from <hf-dir>/tokenizer.json" in msg


def test_same_size_vocabulary_of_another_tokenizer_is_refused(imported, small_tokenizer: Path) -> None:
    model, cfg, _ = _tiny_model(small_tokenizer)
    with pytest.raises(ConfigError, match=r"trained with the tokenizer of sha256 .* the run uses 0{16}"):
        load_init(model, cfg, str(imported["fits"]), "0" * 64)


def test_other_shape_is_refused_naming_tensors_and_both_shapes(imported, small_tokenizer: Path) -> None:
    model, cfg, sha = _tiny_model(small_tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as e:
        load_init(model, cfg, str(imported["hidden"]), sha)
    msg = str(e.value)
    assert "embeddings.word.weight: weights (2048, 32) vs model (2048, 64)" in msg
    assert "model.hidden_size: weights 32 vs run 64" in msg and "--set model.hidden_size=32" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


def test_config_that_changes_the_maths_without_a_shape_is_refused(imported, small_tokenizer: Path) -> None:
    """transformers' default layer_norm_eps is 1e-12, RoBERTa's 1e-5: every shape fits, the outputs differ."""
    model, cfg, sha = _tiny_model(small_tokenizer)
    with pytest.raises(ConfigError, match=r"model\.layer_norm_eps: weights 1e-12 vs run 1e-05\); match it: "
                                          r"--set model\.layer_norm_eps=1e-12"):
        load_init(model, cfg, str(imported["eps"]), sha)


def test_missing_and_unexpected_tensors_are_named() -> None:
    """A state dict that lost one tensor and gained another (a foreign converter, a hand edit)."""
    from roberta_ds.hf.init_check import init_problems

    model = RobertaMLM(TINY)
    weights = dict(model.state_dict())
    del weights["layers.1.ffn.fc.bias"]
    weights["pooler.dense.weight"] = torch.zeros(64, 64)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert init_problems(TINY, weights, TINY, shapes) == [
        "tensors the model has and the weights lack: layers.1.ffn.fc.bias",
        "tensors in the weights the model does not have: pooler.dense.weight"]
    assert init_problems(TINY, dict(model.state_dict()), TINY, shapes, "a" * 64, "a" * 64) == []


@pytest.mark.slow
def test_trainer_refuses_before_any_step(imported, small_tokenizer: Path, small_shards: Path,
                                         tmp_path: Path) -> None:
    """The launch: exit 1 at setup with the message; no step run, nothing left in the output directory."""
    out = tmp_path / "run"
    args = tiny_args(small_tokenizer, small_shards, out, steps=2, ds_config="zero2_bf16",
                     extra=["--set", f"init_from={imported['vocab']}", "--set", "model.max_positions=130"])
    res = run_trainer(args, ranks=1, timeout=240)
    assert res.returncode == 1, res.output[-4000:]
    assert "embeddings.word.weight: weights (2100, 64) vs model (2048, 64)" in res.output, res.output[-4000:]
    assert "embeddings.position.weight" not in res.output  # only what differs is named
    assert not out.exists() or list(out.iterdir()) == []  # nothing written, the run lock released
