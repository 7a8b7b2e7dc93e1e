"""The command blocks of README.md and slurm/README.md, as the tests run them.

Every fenced block in the two READMEs follows a marker line naming it:

    <!-- readme-test: train-launch -->
    ```bash
    deepspeed --num_gpus 8 --module roberta_ds.train --config base.yaml
    ```

Tests fetch a block by name (`readme_block("train-launch")`), scale its sizes down with `scaled()`
(every replaced text must still be in the block, so a README edit cannot silently bypass the test),
and run it with bash in a working directory laid out like a user's (`make_workdir`). SLURM lines go
through `sbatch_shim`, which adds the test cluster's size flags. tests/test_readme.py checks that every
block is marked and names what runs each line of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READMES = (REPO / "README.md", REPO / "slurm" / "README.md")
MARKER = re.compile(r"^\s*<!-- readme-test: ([a-z0-9-]+) -->\s*$")
FENCE = re.compile(r"^( {0,3})(`{3,})([\w-]*)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    """1-based line of the opening fence (0 for an indented code block's first line: see `parse`)."""
    name: str | None
    """From the marker line right above the fence; None when there is none."""
    lang: str
    text: str

    @property
    def where(self) -> str:
        path = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{path}:{self.line}"

    def lines(self) -> list[str]:
        """The block's commands: backslash continuations joined, blank and comment-only lines dropped."""
        out: list[str] = []
        pending = ""
        for raw in self.text.splitlines():
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1].rstrip() + " "
                continue
            pending = ""
            if line and not line.startswith("#"):
                out.append(line)
        return out


def parse(path: Path) -> list[Block]:
    """Every code block of a Markdown file: fenced ones (with their marker, if any) and indented ones
    (a line indented by 4+ spaces after a blank line, outside a fence), which are reported as unmarked."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            indent, fence, lang = m.groups()
            j = i + 1
            while j < len(lines) and not re.match(rf"^ {{0,3}}{fence}`*\s*$", lines[j]):
                j += 1
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                    for line in lines[i + 1:j]]
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            marker = MARKER.match(lines[k]) if k >= 0 else None
            name = marker.group(1) if marker else None
            blocks.append(Block(path, i + 1, name, lang, "\n".join(body) + "\n"))
            i = j + 1
            continue
        if lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            blocks.append(Block(path, i + 1, None, "indented", lines[i].strip() + "\n"))
        i += 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for path in READMES for b in parse(path)]


def readme_block(name: str) -> Block:
    """The README block marked `<!-- readme-test: name -->`."""
    found = [b for b in all_blocks() if b.name == name]
    if len(found) != 1:
        raise KeyError(f"{len(found)} README blocks are marked {name!r}; expected exactly one")
    return found[0]


def scaled(text: str, replacements: list[tuple[str, str]]) -> str:
    """`text` with each (old, new) replaced; every `old` must occur (else the README changed under the
    test)."""
    for old, new in replacements:
        if old not in text:
            raise AssertionError(f"the README text {text!r} no longer contains {old!r}: update the test's "
                                 "scaling to the new command")
        text = text.replace(old, new)
    return text


def run_bash(script: str, cwd: Path, env: dict[str, str],
             timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `script` with bash (-e -u -o pipefail) in its own process group, stdout and stderr together;
    whatever it started is killed when it ends (or at `timeout`)."""
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0] + f"\n[readme_blocks] killed after {timeout} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, output)


def user_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A user's shell after `./scripts/setup.sh`: this venv's bin first on PATH (`roberta-ds`, `python`,
    `deepspeed`, `torchrun`), the checkout importable, DeepSpeed on CPU where there is no GPU."""
    from roberta_ds.quickstart.pipeline import launcher_env

    env = launcher_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def scaled_ds_configs(dst: Path, *, global_batch: int = 8, micro: int = 2, fp32: bool = False) -> Path:
    """Copies of ds_configs/*.json with the batch shrunk to `global_batch` = `micro` x accumulation x world
    (and bf16 off with `fp32`: bf16 matmuls are slow on CPUs)."""
    dst.mkdir(parents=True, exist_ok=True)
    for src in sorted((REPO / "ds_configs").glob("*.json")):
        cfg = json.loads(src.read_text())
        cfg.update(train_batch_size=global_batch, train_micro_batch_size_per_gpu=micro)
        if fp32 and "bf16" in cfg:
            cfg["bf16"] = {**cfg["bf16"], "enabled": False}
        (dst / src.name).write_text(json.dumps(cfg, indent=2))
    return dst


TRAIN_CONFIG_SCALING = [
    ("model: {preset: roberta-base}", "model: {preset: tiny}"),
    ("max_seq_len: 512", "max_seq_len: 64"),
    ("log_interval: 100", "log_interval: 1"),
    ("eval_interval: 2000", "eval_interval: 2"),
    ("save_interval: 2000", "save_interval: 2"),
]
"""The README's training config (block `train-config`) at the tiny size; the runs set max_steps."""


def make_workdir(root: Path, tokenizer: Path, shards: Path, *, fp32: bool = False) -> Path:
    """A directory laid out as the README's commands expect, from the session's fixtures: tok/ (the
    tokenizer), data/ and wiki/ (shard sets made with it), ds_configs/ (batch 8; bf16 off with `fp32`),
    slurm/ (the templates), and base.yaml (block `train-config`, scaled)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, target in (("tok", tokenizer), ("data", shards), ("wiki", shards), ("slurm", REPO / "slurm")):
        (root / name).symlink_to(target, target_is_directory=True)
    scaled_ds_configs(root / "ds_configs", fp32=fp32)
    (root / "base.yaml").write_text(scaled(readme_block("train-config").text, TRAIN_CONFIG_SCALING))
    return root


def sbatch_shim(bin_dir: Path, log: Path) -> Path:
    """An `sbatch` for README lines on the test cluster: it adds the flags in $SHIM_ARGS (sizes, output;
    split at spaces) and --parsable before the line's own flags, prints the job id as `sbatch
    --parsable` does and appends it to `log`. Inside a job (a template submitting its follow-up job)
    it is the real sbatch, untouched."""
    real = shutil.which("sbatch") or "/usr/bin/sbatch"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "sbatch"
    shim.write_text(
        "#!/bin/bash\nset -euo pipefail\n"
        f'if [ -n "${{SLURM_JOB_ID:-}}" ]; then exec {shlex.quote(real)} "$@"; fi\n'
        f'# shellcheck disable=SC2086\nid=$({shlex.quote(real)} --parsable ${{SHIM_ARGS:-}} "$@")\n'
        f'echo "${{id%%;*}}" >> {shlex.quote(str(log))}\necho "$id"\n')
    shim.chmod(0o755)
    return shim
