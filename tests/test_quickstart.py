"""`roberta-ds quickstart`, the README's first command, end to end, short (the slowest tests of the suite).

Two real runs (corpus -> tokenizer -> shards -> 2-rank DeepSpeed training -> committed checkpoint ->
Hugging Face export checked against our logits -> fill-mask -> summary), each a few steps instead of
the default 1,000: the built-in corpus, and `--corpus` on files of every input format. Checked: the
command succeeds; the settings are printed with why they differ from the recipe; metrics.jsonl holds
the MLM accuracy and both baselines (equal to the shard manifests' statistics); the summary's numbers
are the metrics'; the export loads with transformers; the fill-mask sentences come from the
validation split. Refusals (a missing corpus path, an output directory made from other inputs) cost
no training. That the default 1,000 steps end >= 1 nat below the unigram entropy is measured, not
tested here (README, "Quickstart": the built-in corpus and python3-doc).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from launch import REPO, kill_group

from roberta_ds.data.shard_set import read_manifest
from roberta_ds.data.shards import ShardReader
from roberta_ds.quickstart.pipeline import launcher_env

pytestmark = pytest.mark.slow

BUILTIN_STEPS = 150
"""Past the unigram plateau (about -0.4 nats at step 150), so predictions differ between sentences."""
PREDICTION = r"""(?:'[^']*'|"[^"]*") \(\d\.\d\d\)"""  # repr() of the token, then its probability


@dataclass
class Run:
    returncode: int
    output: str
    out: Path

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "run" / "metrics.jsonl").read_text().splitlines()]

    def summary(self) -> str:
        return self.output[self.output.index("\n=== summary") :]


def quickstart(out: Path, *args: str, timeout: float = 600) -> Run:
    script = Path(sys.executable).parent / "roberta-ds"
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "roberta_ds.cli"]
    proc = subprocess.Popen([*head, "quickstart", "--out", str(out), *args], env=launcher_env(), cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc.pid)  # the launcher's ranks too, whatever happened
    return Run(proc.returncode, output, out)


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = quickstart(tmp_path_factory.mktemp("qs") / "out", "--steps", str(BUILTIN_STEPS))
    assert run.returncode == 0, run.output[-6000:]
    return run


def _valid_text(out: Path) -> str:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    m = read_manifest(out / "shards" / "valid")
    return "".join(tok.decode([int(i) for i in seq]) for s in m.shards for seq in ShardReader(out / "shards" / "valid" / s.name))


def _check_run(run: Run, steps: int) -> None:
    """What every quickstart run must show (see the module docstring)."""
    out = run.out
    assert "These differ from the RoBERTa recipe" in run.output  # the settings, and why
    records = run.metrics()
    assert max(r["step"] for r in records) == steps
    evals = [r for r in records if "valid_loss" in r]
    assert len(evals) >= 2 and all(0 <= r["valid_acc"] <= 1 for r in evals)
    # Both baselines in metrics.jsonl, equal to the shard sets' stored statistics.
    stats = {split: read_manifest(out / "shards" / split).token_stats for split in ("train", "valid")}
    assert all(r["valid_unigram_entropy"] == stats["valid"]["entropy"] for r in evals)
    assert all(r["valid_unigram_top1"] == stats["valid"]["top1"] for r in evals)
    train = [r for r in records if "loss" in r]
    assert all(r["unigram_entropy"] == stats["train"]["entropy"] and r["unigram_top1"] == stats["train"]["top1"]
               for r in train)
    assert train[-1]["tokens_seen"] > train[0]["tokens_seen"] > 0
    # The summary: its numbers are the last evaluation's; the export is where it says and loads.
    summary, last = run.summary(), evals[-1]
    assert re.search(rf"^validation loss  {last['valid_loss']:.4f} nats: \d+\.\d\d (below|ABOVE) the validation "
                     rf"tokens' unigram entropy {last['valid_unigram_entropy']:.4f}", summary, re.M), summary
    assert re.search(rf"^MLM accuracy     {100 * last['valid_acc']:.2f}%: \d+\.\d\dx the top-1 baseline "
                     rf"{100 * last['valid_unigram_top1']:.2f}%", summary, re.M), summary
    assert f"tokens seen      {train[-1]['tokens_seen']:,} (" in summary
    assert re.search(r"^wall time        \d+m\d\ds for this command, \d+m\d\ds of it training", summary, re.M)
    assert f"exported model   {out / 'hf'}" in summary
    assert f"AutoModelForMaskedLM.from_pretrained({str(out / 'hf')!r})" in summary
    assert re.search(r"^(the model uses context|goal not reached): validation loss", summary, re.M)
    from transformers import AutoModelForMaskedLM

    assert AutoModelForMaskedLM.from_pretrained(str(out / "hf")).config.model_type == "roberta"
    # Fill-mask: held-out sentences (in the validation split, word restored), five predictions each.
    fill = run.output[run.output.index("=== 6/6") : run.output.index("\n=== summary")]
    found = re.findall(r"^(.*<mask>.*)\n    held-out word '([^']+)' \([^)]*\): (.*)$", fill, re.M)
    assert found, fill
    valid = _valid_text(out)
    for text, word, preds in found:
        assert text.replace("<mask>", word) in valid, text
        assert len(re.findall(PREDICTION, preds)) == 5, preds
    if steps >= BUILTIN_STEPS:
        assert len({preds for _, _, preds in found}) > 1, "every sentence got the same predictions"


def test_builtin_corpus_end_to_end(builtin_run: Run) -> None:
    assert "built-in corpus: docstrings and comments of the Python standard library" in builtin_run.output
    _check_run(builtin_run, steps=BUILTIN_STEPS)
    assert re.search(r"-> .*hf: max abs logit diff vs ours \S+ \(<= ", builtin_run.output)


def test_own_corpus_of_every_format(builtin_corpus: Path, tmp_path: Path) -> None:
    """--corpus: a .jsonl, a .jsonl.gz and, in a nested directory, .txt files (documents between blank lines)."""
    files = sorted(builtin_corpus.iterdir())
    docs = [json.loads(line)["text"] for f in files for line in f.read_text().splitlines()]
    mine = tmp_path / "mine"
    (mine / "deeper").mkdir(parents=True)
    shutil.copyfile(files[0], mine / "a.jsonl")
    (mine / "b.jsonl.gz").write_bytes(gzip.compress(files[1].read_bytes()))
    (mine / "deeper" / "c.txt").write_text("\n\n".join(docs[-400:]) + "\n")
    run = quickstart(tmp_path / "out", "--corpus", str(mine), "--steps", "10")
    assert run.returncode == 0, run.output[-6000:]
    assert f"your corpus: {mine}: 3 file(s)" in run.output
    created = read_manifest(tmp_path / "out" / "shards" / "train").created_by
    assert sorted(Path(f).name for f in created["inputs"]) == ["a.jsonl", "b.jsonl.gz", "c.txt"]
    _check_run(run, steps=10)


def test_bad_inputs_are_refused_before_training(builtin_run: Run, tmp_path: Path) -> None:
    """A missing path, bytes that are not UTF-8 (naming file and line, and the flag that accepts them),
    an output directory made from other inputs: exit 1 before any training."""
    missing = quickstart(tmp_path / "out", "--corpus", str(tmp_path / "nope.txt"))
    assert missing.returncode == 1 and f"{tmp_path / 'nope.txt'}: input file not found" in missing.output
    assert "=== 2/6" not in missing.output
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me.\n".encode("latin-1"))
    binary = quickstart(tmp_path / "out2", "--corpus", str(tmp_path / "latin1.txt"))
    assert binary.returncode == 1 and f"{tmp_path / 'latin1.txt'}:1: not UTF-8" in binary.output
    assert "--on-decode-error=replace" in binary.output and "=== 4/6" not in binary.output
    (tmp_path / "one.txt").write_text("A sentence of text.\n")
    other = quickstart(builtin_run.out, "--corpus", str(tmp_path / "one.txt"), "--steps", str(BUILTIN_STEPS))
    assert other.returncode == 1 and "made by an earlier quickstart from other inputs" in other.output
    assert "pass --fresh" in other.output and "=== 2/6" not in other.output


# The README's three output blocks (quickstart-console, -summary, -fill) are copies of a 1,000-step run;
# each of their lines must have the form of a line this run prints, so the README cannot drift from the
# code's output. What varies between runs (numbers, quoted tokens, paths, the outcome words) is a
# wildcard; everything else must be printed verbatim.
_VARIES = re.compile(r"""
    (?P<outcome>the\ model\ uses\ context|goal\ not\ reached)
  | (?P<side>\bbelow\b|\bABOVE\b)
  | (?P<rank>\((?:not\ in\ the\ top\ 5|\#\d\ of\ the\ model's\ top\ 5)\))
  | (?P<rest>\ \|\ \.\.\.$)
  | (?P<quoted>'[^']*'|"[^"]*")
  | (?P<path>(?<=\s)/\S+)
  | (?P<number>[-+]?\d[\d,.]*)
""", re.X)
_WILD = {"outcome": "(?:the model uses context|goal not reached)", "side": "(?:below|ABOVE)",
         "rank": r"\((?:not in the top 5|#\d of the model's top 5)\)", "rest": r" \| .*",
         "quoted": r"""(?:'[^']*'|"[^"]*")""", "path": r"/\S+", "number": r"[-+]?\d[\d,.]*"}


def readme_line_form(line: str) -> str:
    """A regex matching every printed line of `line`'s form (see above)."""
    out, pos = [], 0
    for m in _VARIES.finditer(line):
        out += [re.escape(line[pos:m.start()]), _WILD[m.lastgroup]]
        pos = m.end()
    # A goal not reached adds its advice after a semicolon.
    advice = "(?:; .*)?" if _VARIES.match(line) and _VARIES.match(line).lastgroup == "outcome" else ""
    return "".join([*out, re.escape(line[pos:]), advice])


def test_readme_line_form_tells_forms_apart() -> None:
    form = readme_line_form("MLM accuracy     22.42%: 5.99x the top-1 baseline 3.74% (always the most frequent token)")
    assert re.fullmatch(form, "MLM accuracy     8.10%: 2.17x the top-1 baseline 3.74% (always the most frequent token)")
    assert not re.fullmatch(form, "MLM accuracy 8.10%: 2.17x the top-1 baseline 3.74%")
    held = readme_line_form("    held-out word 'get' (not in the top 5): 'to' (0.08), 'and' (0.07)")
    assert re.fullmatch(held, "    held-out word 'the' (#1 of the model's top 5): 'the' (0.57), 'a' (0.13)")
    assert not re.fullmatch(held, "    held-out word 'the': 'the' (0.57), 'a' (0.13)")


@pytest.mark.parametrize("name", ["quickstart-console", "quickstart-summary", "quickstart-fill"])
def test_readme_outputs_have_the_runs_form(builtin_run: Run, name: str) -> None:
    from readme_blocks import readme_block

    printed = builtin_run.output.splitlines()
    for line in readme_block(name).text.splitlines():
        form = readme_line_form(line)
        if "<mask>" in line and not line.startswith(" "):
            form = r"\S.*<mask>.*"  # a held-out sentence: which ones depends on the corpus's validation split
        assert any(re.fullmatch(form, p) for p in printed), f"README line {line!r} is printed by no line of the run"
