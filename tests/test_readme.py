"""Every command block of README.md and slurm/README.md is run by a test, scaled down (CPU, the tiny
model, a few steps); only a block that needs a GPU or several nodes may be exempt, by name, below.

Each block carries a marker (`<!-- readme-test: NAME -->`, tests/readme_blocks.py) and an entry in
BLOCKS: either `Checked`, naming for each of its lines the test that runs it and how it is scaled, or
`Exempt` with the reason. `test_every_readme_block_is_checked_or_exempt` fails for a block without a
marker or entry, an entry without a block, a line no test runs, or a named test that does not fetch
its block with `readme_block("NAME")` (so it runs the README's text, not a copy). Blocks that long
tests already run (the quickstart, the SLURM templates) are run there, not twice.

Run here: `data` (the data tools), `train-launch` lines 1-2 (the deepspeed launcher, then torchrun
resuming its checkpoint) with `train-config` as base.yaml, `hf-export-import` on that run,
`mfu-formula` (evaluated against the code), `plan`, `plan-sweep`, `tests` line 2 (collection only:
CI runs the tests themselves).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from launch import free_port
from readme_blocks import (
    REPO,
    Block,
    all_blocks,
    make_workdir,
    parse,
    readme_block,
    run_bash,
    scaled,
    user_env,
)


@dataclass(frozen=True)
class Run:
    by: str
    """`tests/FILE.py::name` (a test or fixture that runs the lines), or `.ci/run`."""
    lines: tuple[int, ...]
    """1-based command lines of the block (readme_blocks.Block.lines) it runs."""
    how: str
    """How the lines are scaled down."""
    evidence: str = ""
    """Text that must be in `by`'s file; default `readme_block("NAME")`."""


@dataclass(frozen=True)
class Checked:
    runs: tuple[Run, ...]


@dataclass(frozen=True)
class Exempt:
    reason: str
    """Why no test can run it: it needs a GPU or several nodes."""


HERE = "tests/test_readme.py"
TEMPLATES = "tests/test_slurm_templates.py"
QUICKSTART = "tests/test_quickstart.py"
BLOCKS: dict[str, Checked | Exempt] = {
    "quickstart": Checked((
        Run(".ci/run", (1,), "`./scripts/setup.sh` is the first half of CI's command",
            "./scripts/setup.sh &&"),
        Run("tests/test_quickstart.py::test_builtin_corpus_end_to_end", (1,),
            "`roberta-ds quickstart --steps 150 --out <tmp>` (the README's default is 1,000 steps)",
            '"quickstart", "--out"'),
    )),
    "quickstart-console": Checked((Run(f"{QUICKSTART}::test_readme_outputs_have_the_runs_form", (),
                         "each line's form against the 150-step run's output", '"quickstart-console"'),)),
    "quickstart-summary": Checked((Run(f"{QUICKSTART}::test_readme_outputs_have_the_runs_form", (),
                         "each line's form against the 150-step run's output", '"quickstart-summary"'),)),
    "quickstart-fill": Checked((Run(f"{QUICKSTART}::test_readme_outputs_have_the_runs_form", (),
                         "each line's form against the 150-step run's output", '"quickstart-fill"'),)),
    "test-suite": Checked((Run(".ci/run", (1,), "CI runs exactly this line on a fresh clone"),)),
    "data": Checked((Run(f"{HERE}::test_data_commands", (1, 2, 3, 4, 5, 6, 7),
                         "vocabulary 2,048, 2 workers; `/path/roberta-base` is the suite's tokenizer, "
                         "`more/` the suite's shards"),)),
    "train-launch": Checked((
        Run(f"{HERE}::trained_workdir", (1, 2), "2 CPU ranks each; the deepspeed launcher trains steps 1-2, "
            "torchrun resumes and trains 3-4 (`--set max_steps`)"),
        Run(f"{TEMPLATES}::test_readme_srun_and_mpirun_lines_train_from_base_yaml", (3, 4),
            "in a 2-task job on the test cluster; srun trains steps 1-2, mpirun (-np 2) resumes to 4"),
    )),
    "train-config": Checked((
        Run(f"{HERE}::trained_workdir", (), "as base.yaml with the tiny preset, sequence 64, intervals "
            "1/2/2; ds_configs/ at batch 8 (readme_blocks.make_workdir reads it)", "make_workdir("),
    )),
    "mfu-formula": Checked((Run(f"{HERE}::test_mfu_formula_is_what_the_trainer_computes", (1,),
                                "evaluated as Python and compared with metrics.flops_per_token and mfu"),)),
    "hf-export-import": Checked((Run(f"{HERE}::test_export_and_import_commands", (1, 2),
                                     "on the run of `train-launch`; `roberta-base/` is that run's export"),)),
    "cluster-sbatch": Checked((
        Run(f"{TEMPLATES}::straight_run", (1, 4),
            "2 CPU ranks on the one-node cluster, 10 steps; the export chained"),
        Run(f"{TEMPLATES}::test_deepspeed_launcher_template_runs_from_its_hostfile", (2,),
            "2 ranks, preempted"),
        Run(f"{TEMPLATES}::test_preprocess_array_and_merge_equal_build_shards", (3,), "an array of 3 tasks"),
    )),
    "continued-pretraining": Checked((
        Run("tests/test_init_from.py::test_continued_pretraining_recipe", (1, 2, 3, 4),
            "`roberta-base/` a tiny transformers model with the suite's tokenizer, `domain/` a quarter of "
            "the built-in corpus, 2 workers; 2 CPU ranks, fp32, 2 steps, dropout 0"),
    )),
    "plan": Checked((Run(f"{HERE}::test_plan_commands", (1, 2), "as written (the planner needs no GPU)",
                         '"plan": [['),)),
    "plan-sweep": Checked((Run(f"{HERE}::test_plan_commands", (1, 2), "as written", '"plan-sweep": [['),)),
    "tests": Checked((
        Run(".ci/run", (1,), "CI runs exactly this line",
            "./scripts/setup.sh && .venv/bin/python -m pytest -q"),
        Run(f"{HERE}::test_fast_test_command_selects_the_fast_tests", (2,),
            "--collect-only: CI runs the tests themselves"),
    )),
    "sbatch-knobs": Checked((
        Run(f"{TEMPLATES}::test_preempted_run_saves_requeues_resumes_and_matches", (1,),
            "2 CPU ranks, batch 8 (`train_batch_size=8192` -> 8), preempted and requeued"),
    )),
    "chaining": Checked((
        Run(f"{TEMPLATES}::test_trainer_under_srun_mpi_pmix_sees_mpi4py_world", (1, 2),
            "2 ranks, 2 steps, SRUN_ARGS=--mpi=pmix and CONFIG in the environment; export chained"),
        Run(f"{TEMPLATES}::test_preprocess_array_and_merge_equal_build_shards", (3,),
            "the same line as cluster-sbatch's third, run once there"),
    )),
    "multinode-cluster": Checked((
        Run("tests/test_slurm_multinode.py::test_readme_cluster_by_hand_and_a_stop_that_leaves_nothing",
            (1, 2, 3, 4, 5, 6, 7, 8, 9), "2 nodes, in the test's directory; before the stop a job is left "
            "running and another node cut (a failed test's state); the stop runs twice"),
    )),
}


def coverage_problems(blocks: list[Block], registry: dict[str, Checked | Exempt],
                      root: Path = REPO) -> list[str]:
    """Why the blocks and the registry disagree (empty when every block is run or exempt)."""
    problems = []
    names = [b.name for b in blocks if b.name]
    for b in blocks:
        if b.name is None:
            problems.append(f"{b.where}: a {b.lang or 'code'} block without a `<!-- readme-test: NAME -->` "
                            "marker line above its fence (indented blocks: make them fenced)")
        elif b.name not in registry:
            problems.append(f"{b.where}: block {b.name!r} is neither checked nor exempt in "
                            "tests/test_readme.py")
    problems += [f"block {n!r} is marked twice" for n in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"tests/test_readme.py names block {n!r}, which no README has"
                 for n in registry if n not in names]
    for b in blocks:
        entry = registry.get(b.name or "")
        if not isinstance(entry, Checked):
            continue
        covered = set()
        for run in entry.runs:
            covered |= set(run.lines or range(1, len(b.lines()) + 1))
            path = root / run.by.split("::")[0]
            text = path.read_text() if path.is_file() else ""
            if not text:
                problems.append(f"block {b.name!r}: {run.by}: no such file")
                continue
            defined = re.search(rf"^def {re.escape(run.by.split('::')[-1])}\(", text, re.MULTILINE)
            if "::" in run.by and not defined:
                problems.append(f"block {b.name!r}: {run.by}: no such test or fixture")
            evidence = run.evidence or (b.lines()[run.lines[0] - 1] if run.by.startswith(".ci/")
                                        else f'readme_block("{b.name}")')
            if evidence not in text:
                problems.append(f"block {b.name!r}: {run.by} does not contain {evidence!r}, so it does not "
                                "run it")
        missing = sorted(set(range(1, len(b.lines()) + 1)) - covered)
        if missing:
            unrun = [b.lines()[i - 1] for i in missing]
            problems.append(f"block {b.name!r}: line(s) {missing} run by no test: {unrun}")
    return problems


def test_every_readme_block_is_checked_or_exempt() -> None:
    blocks = all_blocks()
    assert len(blocks) >= 13
    assert coverage_problems(blocks, BLOCKS) == []


def test_an_unchecked_block_fails_the_check(tmp_path: Path) -> None:
    """A new block without a marker, one marked but not registered, a line no test runs: each is named."""
    doc = tmp_path / "README.md"
    doc.write_text("# x\n\n```bash\nrm -rf /\n```\n\n<!-- readme-test: fresh -->\n```bash\necho hi\n```\n\n"
                   "    indented --command\n\n<!-- readme-test: half -->\n```bash\necho 1\necho 2\n```\n\n"
                   "<!-- readme-test: gpu-only -->\n```bash\nnvidia-smi\n```\n")
    (tmp_path / "t.py").write_text('def test_x():\n    readme_block("half")\n')
    registry = {"half": Checked((Run("t.py::test_x", (1,), "-"),)), "gpu-only": Exempt("needs a GPU"),
                "gone": Exempt("-")}
    problems = coverage_problems(parse(doc), registry, root=tmp_path)
    assert problems == [
        f"{doc}:3: a bash block without a `<!-- readme-test: "
        "NAME -->` marker line above its fence (indented blocks: make them fenced)",
        f"{doc}:8: block 'fresh' is neither checked nor exempt in tests/test_readme.py",
        f"{doc}:12: a indented block without a `<!-- readme-test: NAME -->` marker line above its fence "
        "(indented blocks: make them fenced)",
        "tests/test_readme.py names block 'gone', which no README has",
        "block 'half': line(s) [2] run by no test: ['echo 2']",
    ]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert readme_block("test-suite").lines() == [ci[-1]]
    assert readme_block("tests").lines()[0].split("#")[0].strip() == ci[-1]
    assert readme_block("quickstart").lines()[0].startswith("./scripts/setup.sh && ")


# ----------------------------------------------------------------------------------------------
# The blocks run here


def test_data_commands(tmp_path: Path, small_tokenizer: Path, small_shards: Path) -> None:
    """The data block, as a user types it in an empty directory (the adopted 'roberta-base' tokenizer
    is the suite's, and `more/train` the suite's shards made with it)."""
    (tmp_path / "more").symlink_to(small_shards, target_is_directory=True)
    script = scaled(readme_block("data").text, [
        ("--vocab-size 50265", "--vocab-size 2048"), ("--workers 8", "--workers 2"),
        ("/path/roberta-base/tokenizer.json", str(small_tokenizer / "tokenizer.json")),
    ])
    proc = run_bash(script, tmp_path, user_env())
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert list((tmp_path / "corpus").glob("*.jsonl"))
    adopted = (tmp_path / "tok" / "tokenizer.json").read_bytes()
    assert adopted == (small_tokenizer / "tokenizer.json").read_bytes()
    assert "sequence 0 (shard-00000 #0," in proc.stdout and "document 3 (shard-00000 #3," in proc.stdout
    assert "OK data/train: " in proc.stdout and "OK data/valid: " in proc.stdout, proc.stdout[-4000:]
    manifests = {name: json.loads((tmp_path / name / "manifest.json").read_text())
                 for name in ("data/train", "more/train", "all/train")}
    documents = {name: m["totals"]["documents"] for name, m in manifests.items()}
    assert documents["all/train"] == documents["data/train"] + documents["more/train"]


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Path, small_shards: Path):
    """The first two lines of `train-launch` in a user's directory with base.yaml (`train-config`):
    the deepspeed launcher trains steps 1-2, then torchrun resumes and trains steps 3-4."""
    work = make_workdir(tmp_path_factory.mktemp("readme") / "work", small_tokenizer, small_shards)
    lines = readme_block("train-launch").lines()
    launches = [
        scaled(lines[0], [("--num_gpus 8", f"--num_gpus 2 --master_port {free_port()}"),
                          ("--config base.yaml", "--config base.yaml --set max_steps=2")]),
        scaled(lines[1], [("--nproc-per-node 8", f"--nproc-per-node 2 --master-port {free_port()}"),
                          ("--config base.yaml", "--config base.yaml --set max_steps=4")]),
    ]
    outputs = []
    for line in launches:
        proc = run_bash(line, work, user_env(), timeout=400)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-6000:]}"
        outputs.append(proc.stdout)
    return work, outputs


@pytest.mark.slow
def test_training_commands(trained_workdir) -> None:
    work, (first, second) = trained_workdir
    run = work / "runs" / "base"
    assert "from deepspeed" in first and "from torchrun" in second
    assert "x world 2; bf16, ZeRO-2" in first
    assert "resumed from runs/base/checkpoints/step_00000002 at step 2" in second
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "valid_loss" in r] == [2, 4]  # eval_interval 2, data.valid
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (run / "run.lock").exists()


@pytest.mark.slow
def test_export_and_import_commands(trained_workdir) -> None:
    from roberta_ds.hf.convert import load_pretrained

    work, _ = trained_workdir
    script = scaled(readme_block("hf-export-import").text, [("--hf-dir roberta-base/", "--hf-dir hf/")])
    proc = run_bash(script, work, user_env())
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "max abs logit diff vs ours" in proc.stdout
    assert "checked: max abs logit diff vs Hugging Face" in proc.stdout
    cfg, weights = load_pretrained(work / "init")  # what `--set init_from=init/` loads
    assert (cfg.num_layers, cfg.hidden_size) == (2, 64) and weights


def test_mfu_formula_is_what_the_trainer_computes() -> None:
    from roberta_ds.config import PRESETS
    from roberta_ds.engine.metrics import flops_per_token, mfu

    text = readme_block("mfu-formula").lines()[0]
    flops_expr, mfu_expr = (part.split("=", 1)[1] for part in re.split(r"\s{3,}", text))
    python = {"·": "*", "²": "**2", "flops/token": "flops_token", "tokens/s": "tokens_s"}
    for old, new in python.items():
        flops_expr, mfu_expr = flops_expr.replace(old, new), mfu_expr.replace(old, new)
    cfg = PRESETS["roberta-base"]
    h, L, V, s, f = cfg.hidden_size, cfg.num_layers, cfg.vocab_size, 512, 0.15
    names = {"h": h, "L": L, "V": V, "s": s, "f": f,
             "P_layers": L * (4 * h * h + 2 * h * cfg.ffn_size)}  # the README's next sentence
    flops_token = eval(flops_expr, {}, names)
    assert flops_token == pytest.approx(flops_per_token(cfg, s, f), rel=1e-12)
    got = eval(mfu_expr, {}, {"tokens_s": 560_800, "flops_token": flops_token, "GPUs": 1, "peak": 989e12})
    assert got == pytest.approx(mfu(560_800, flops_token, 1, 989.0), rel=1e-12) and 0.2 < got < 0.5


PLAN_OUTPUT = {
    "plan": [[r"roberta-ds plan: roberta-large \(355\.4M params\), 1024 x h100-80gb \(80 GiB\), ZeRO-2"],
             [r"roberta-base\s+1024\s"]],
    # The README's scaling table (5.4 days / 16.5 h / 1.3 h, 15.9 days / 48.4 h / 3.8 h) from these lines.
    "plan-sweep": [[r"roberta-base\s+8\s.*\(5\.42 days\)", r"roberta-base\s+64\s.* 16\.5 h",
                    r"roberta-base\s+1024\s.* 1\.3 h"],
                   [r"roberta-large\s+8\s.*\(15\.87 days\)", r"roberta-large\s+64\s.* 48\.4 h",
                    r"roberta-large\s+1024\s.* 3\.8 h"]],
}


@pytest.mark.parametrize("name", sorted(PLAN_OUTPUT))
def test_plan_commands(name: str, tmp_path: Path) -> None:
    for line, patterns in zip(readme_block(name).lines(), PLAN_OUTPUT[name], strict=True):
        proc = run_bash(line, tmp_path, user_env())
        assert proc.returncode == 0, proc.stdout[-4000:]
        for pattern in patterns:
            assert re.search(pattern, proc.stdout), (line, pattern, proc.stdout[-4000:])


def test_fast_test_command_selects_the_fast_tests() -> None:
    line = readme_block("tests").lines()[1]
    command = scaled(line.split("#")[0].strip(), [(".venv/bin/python", sys.executable)])
    proc = run_bash(f"{command} --collect-only -p no:cacheprovider", REPO, user_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    collected = re.search(r"(\d+)/(\d+) tests collected \((\d+) deselected\)", proc.stdout)
    assert collected and int(collected.group(1)) > 100 and int(collected.group(3)) > 20, proc.stdout[-2000:]
    assert "tests/test_masking.py::" in proc.stdout and "test_kill_9_chain" not in proc.stdout
    for slow in ("test_pretrain_template_trains_two_ranks", "test_training_commands"):
        assert slow not in proc.stdout
