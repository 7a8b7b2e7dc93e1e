"""The quickstart's parts without a launch: settings, held-out fill-mask examples, the summary, the console line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from roberta_ds.config_load import train_config_from_dict
from roberta_ds.data.shard_set import read_manifest
from roberta_ds.data.shards import ShardReader
from roberta_ds.data.tokenizer import tokenizer_vocab_size
from roberta_ds.engine.metrics import console_line
from roberta_ds.errors import ConfigError, UserError
from roberta_ds.model.model import RobertaMLM
from roberta_ds.quickstart.fill import Example, _whole_words, format_example, validation_examples
from roberta_ds.quickstart.report import read_result, summary_lines, verdict
from roberta_ds.quickstart.settings import MAX_EVAL_TOKENS, QuickstartSettings


def test_settings_make_a_valid_train_config_whose_model_they_describe(small_tokenizer: Path, tmp_path: Path) -> None:
    s = QuickstartSettings()
    raw = s.train_config(shards=tmp_path / "shards", tokenizer=small_tokenizer, run_dir=tmp_path / "run",
                         valid_blocks=1000, ranks=2)
    cfg = train_config_from_dict(raw, vocab_size_of=tokenizer_vocab_size)
    assert (cfg.data.max_seq_len, cfg.model.max_seq_len, cfg.model.hidden_size) == (32, 32, 128)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.total_steps, cfg.model.dropout) == (3e-3, 60, 1000, 0.0)
    assert cfg.eval_batches == 8  # 1,000 blocks in 128-row global batches: the whole split
    model = RobertaMLM(cfg.model)
    assert s.parameters(cfg.model.vocab_size) == sum(p.numel() for p in model.parameters())
    text = s.describe(2, "CPU", cfg.model.vocab_size)
    assert "0.68M parameters" in text and "These differ from the RoBERTa recipe" in text


def test_quickstart_clips_where_the_shipped_config_does_not() -> None:
    from roberta_ds.engine.ds_config import batch_plan, load_ds_config
    from roberta_ds.quickstart.settings import DS_CONFIG

    assert load_ds_config(DS_CONFIG)["gradient_clipping"] == 0.0        # the RoBERTa recipe: no clipping
    ds = load_ds_config(DS_CONFIG, QuickstartSettings().ds_overrides(2, gpus=False)[1::2])
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is False   # as its curves were measured
    plan = batch_plan(ds, 2)
    assert (plan.global_batch, plan.micro_batch, plan.grad_accum) == (128, 64, 1)


def test_settings_refuse_bad_values_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match="quickstart --ranks 3: must divide the global batch of 128"):
        QuickstartSettings().micro_batch(3)
    with pytest.raises(ConfigError, match="quickstart --steps: must be >= 1, got 0"):
        QuickstartSettings(steps=0)
    s = QuickstartSettings()
    assert s.eval_batches(10**6, 2) * 128 * 32 <= MAX_EVAL_TOKENS  # a large split is capped
    assert s.eval_batches(1, 8) == 1


@pytest.mark.parametrize("tokens, expected", [
    (["Set", "\u0120the", "\u0120name", "\u0120of", "."], [1, 2]),  # "of": under 3 letters
    (["A", "\u0120set", "_", "seq", "\u0120ok"], []),  # "set" is glued to "_seq"; "ok": 2 letters
    (["A", "\u0120words", ",", "\u0120then", "s"], [1]),  # "then" continues as "thens"
])
def test_whole_words(tokens: list[str], expected: list[int]) -> None:
    assert _whole_words(tokens) == expected


def test_examples_are_held_out_sentences_with_one_word_masked(small_shards: Path, small_tokenizer: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(small_tokenizer / "tokenizer.json"))
    valid = small_shards / "valid"
    sentences = {tok.decode([int(i) for i in seq]).strip() for s in read_manifest(valid).shards
                 for seq in ShardReader(valid / s.name)}
    examples = validation_examples(valid, small_tokenizer, count=4)
    assert len(examples) == 4 and examples == validation_examples(valid, small_tokenizer, count=4)
    for e in examples:
        assert e.text.count("<mask>") == 1 and e.answer.isalpha() and len(e.answer) >= 3
        assert e.text.replace("<mask>", e.answer) in sentences
    line = format_example(Example("A <mask> here.", "cat"), [("dog", 0.5), ("cat", 0.25)])
    assert "held-out word 'cat' (#2 of the model's top 2): 'dog' (0.50), 'cat' (0.25)" in line


def _metrics(tmp_path: Path, valid_loss: float, valid_acc: float) -> Path:
    base = {"unigram_entropy": 6.5, "unigram_top1": 0.035}
    lines = [{"step": 10, "loss": 6.0, "tokens_seen": 1000, **base},
             {"step": 20, "loss": 5.0, "tokens_seen": 2000, **base, "valid_loss": valid_loss, "valid_ppl": 1.0,
              "valid_acc": valid_acc, "valid_unigram_entropy": 6.4, "valid_unigram_top1": 0.04}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_summary_sets_the_run_against_both_baselines(tmp_path: Path) -> None:
    r = read_result(_metrics(tmp_path, 4.4, 0.2))
    assert (round(r.nats_below, 6), r.acc_ratio, r.tokens_seen, r.uses_context) == (2.0, 5.0, 2000, True)
    lines = summary_lines(r, steps=20, global_batch=10, seq_len=20, hf_dir=Path("/x/hf"), wall_s=125, train_s=61)
    assert lines[0].startswith("the model uses context: validation loss 2.00 nats below the unigram entropy")
    assert "validation loss  4.4000 nats: 2.00 below the validation tokens' unigram entropy 6.4000 " \
           "(training tokens: 6.5000)" in lines
    assert any(x.startswith("MLM accuracy     20.00%: 5.00x the top-1 baseline 4.00%") for x in lines)
    assert "tokens seen      2,000 (50% of 20 steps x 10 sequences x 20 positions; the rest is padding)" in lines
    assert "wall time        2m05s for this command, 1m01s of it training" in lines
    assert any("AutoModelForMaskedLM.from_pretrained('/x/hf')" in x for x in lines)
    assert verdict(read_result(_metrics(tmp_path, 5.9, 0.2))).startswith("goal not reached")
    assert verdict(read_result(_metrics(tmp_path, 4.0, 0.07))).startswith("goal not reached")  # 1.75x


def test_summary_of_a_run_without_evaluation_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 6.0, "unigram_entropy": 6.5, "unigram_top1": 0.1}) + "\n")
    with pytest.raises(UserError, match=rf"{path}: no evaluation with baselines"):
        read_result(path)


def test_console_line_sets_loss_and_accuracy_against_the_baselines() -> None:
    r = {"step": 5, "loss": 5.5, "lr": 1e-3, "tokens_per_s": 1000.0, "unigram_entropy": 6.48,
         "valid_loss": 5.25, "valid_ppl": 190.6, "valid_acc": 0.2242, "valid_unigram_entropy": 6.4339,
         "valid_unigram_top1": 0.0374}
    line = console_line(r, 10, 3.0)
    assert "loss 5.5000 vs unigram 6.48 (-0.98)" in line
    assert "valid 5.2500 (ppl 190.60) vs unigram 6.43 (-1.18)" in line
    assert "acc 22.42% vs top-1 3.7% (5.99x)" in line
    plain = console_line({k: v for k, v in r.items() if "unigram" not in k}, 10, 3.0)
    assert "vs" not in plain and "acc 22.42%" in plain


def test_count_correct_through_the_engine_call_signature() -> None:
    """evaluate() calls the engine with count_correct=True: the model answers with (loss, correct)."""
    from roberta_ds.config import model_config

    torch.manual_seed(0)
    model = RobertaMLM(model_config("tiny", vocab_size=50)).eval()
    ids = torch.randint(5, 50, (2, 8))
    out = model(ids, torch.tensor([[1, 2], [3, 0]]), torch.tensor([[7, 9], [11, -100]]), count_correct=True)
    assert isinstance(out, tuple) and out[1].shape == () and 0 <= int(out[1]) <= 3


def test_deepspeed_launcher_without_its_script_runs_as_a_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSpeed installed with `pip --target` (the GPU machines) has no `deepspeed` script beside the
    interpreter: the launcher is then the same entry point run as a module, and it starts."""
    import subprocess
    import sys

    from roberta_ds.quickstart.pipeline import deepspeed_launcher

    real = sys.executable
    assert deepspeed_launcher() == [str(Path(real).parent / "deepspeed")]  # this venv has the script
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python3"))
    cmd = deepspeed_launcher()
    assert cmd == [str(tmp_path / "python3"), "-m", "deepspeed.launcher.runner"]
    proc = subprocess.run([real, *cmd[1:], "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "--num_gpus" in proc.stdout, proc.stderr[-2000:]
