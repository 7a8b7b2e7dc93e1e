"""The package's layering, pinned: arrows point down, and the heavy dependencies stay in their wing.

- `roberta_ds/model/` and `roberta_ds/data/` import neither deepspeed nor torch.distributed (and
  never reach `torch.distributed.` through an attribute): they are single-process code.
- Only `roberta_ds/engine/` and `roberta_ds/checkpoint/` import deepspeed.
- `data/` and `model/` import nothing of engine, checkpoint, hf, launch, plan or quickstart.
- Nothing imports `bench/` (it is measurement scripts, not a library).

Read from the source with `ast` (nothing is imported), so lazy imports inside functions count too.
The checker is tested on a small tree with violations, so a test that passes means something.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UPPER = ("engine", "checkpoint", "hf", "launch", "plan", "quickstart")


@dataclass(frozen=True)
class Use:
    file: str
    line: int
    name: str
    """The dotted module imported (`deepspeed.comm`), or `torch.distributed` for an attribute use."""


def uses(path: Path) -> list[Use]:
    """Every module `path` imports (top level or inside functions), and `torch.distributed` attribute use."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Use(str(path), node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(Use(str(path), node.lineno, node.module))
            out += [Use(str(path), node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Attribute) and node.attr == "distributed"
              and isinstance(node.value, ast.Name) and node.value.id == "torch"):
            out.append(Use(str(path), node.lineno, "torch.distributed"))
    return out


def _is(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def violations(root: Path) -> list[str]:
    """The layering rules broken under `root` (a checkout: roberta_ds/, data_tools/, tests/, bench/)."""
    found = []
    pkg = root / "roberta_ds"
    files = [p for d in ("roberta_ds", "data_tools", "tests", "bench") for p in sorted((root / d).rglob("*.py"))]
    for path in files:
        rel = path.relative_to(root)
        wing = rel.parts[1] if rel.parts[0] == "roberta_ds" and len(rel.parts) > 2 else None
        for u in uses(path):
            where = f"{rel}:{u.line} imports {u.name}"
            if _is(u.name, "bench"):
                found.append(f"{where}: nothing imports bench/ (run its scripts instead)")
            if path.is_relative_to(pkg) and _is(u.name, "deepspeed") and wing not in ("engine", "checkpoint"):
                found.append(f"{where}: only roberta_ds/engine/ and roberta_ds/checkpoint/ import deepspeed")
            if rel.parts[0] == "data_tools" and _is(u.name, "deepspeed"):
                found.append(f"{where}: only roberta_ds/engine/ and roberta_ds/checkpoint/ import deepspeed")
            if wing in ("model", "data"):
                if _is(u.name, "torch.distributed") or _is(u.name, "deepspeed"):
                    found.append(f"{where}: roberta_ds/{wing}/ is single-process code")
                if any(_is(u.name, f"roberta_ds.{up}") for up in UPPER):
                    found.append(f"{where}: roberta_ds/{wing}/ sits below {', '.join(UPPER)}")
    return found


def test_the_package_keeps_its_layering() -> None:
    assert violations(REPO) == []


def test_the_checker_catches_each_kind_of_violation(tmp_path: Path) -> None:
    files = {
        "roberta_ds/model/bad.py": "import torch\n\ndef f():\n    return torch.distributed.get_rank()\n",
        "roberta_ds/data/bad.py": "def f():\n    from deepspeed import comm\n    from roberta_ds.engine import trainer\n",
        "roberta_ds/launch/bad.py": "import deepspeed\n",
        "roberta_ds/engine/ok.py": "import deepspeed\nimport torch.distributed\n",
        "tests/bad.py": "from bench.loader import main\n",
        "data_tools/ok.py": "from roberta_ds.data import shards\n",
        "bench/ok.py": "import torch\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = violations(tmp_path)
    assert sorted({f.split(":")[0] for f in found}) == [
        "roberta_ds/data/bad.py", "roberta_ds/launch/bad.py", "roberta_ds/model/bad.py", "tests/bad.py"]
    assert any("single-process" in f and "torch.distributed" in f for f in found)
    assert any("data/bad.py" in f and "deepspeed" in f and "single-process" in f for f in found)
    assert any("data/bad.py" in f and "sits below" in f for f in found)
    assert any("launch/bad.py" in f and "only roberta_ds/engine/" in f for f in found)
    assert any("tests/bad.py" in f and "bench/" in f for f in found)
