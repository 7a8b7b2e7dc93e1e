"""The project carries what it references: no tracked file points outside the repository.

A user clones this repository and nothing else, so a README line, a docstring, a script or a test
that names `../shared/...`, the `shared/` folder of the machine it was developed on, an absolute path
of that machine, or a relative path that climbs above the repository root names a file the user does
not have. Raw run output under bench/results/ is exempt: it records what a machine printed (pytest's
`rootdir:` line names the checkout it ran in), it is not something the project reads or tells anyone
to read. So is this file, whose examples are such references.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXEMPT = ("bench/results/", "tests/test_self_contained.py")

SHARED = re.compile(r"(?<![\w./-])(?:\.\./)*shared/")
"""`shared/...` or `../shared/...` as a path of its own (not e.g. `torch_shared/` or `/dev/shm`)."""
CLIMB = re.compile(r"(?<![\w.])(?:\.\./)+[\w.-][\w./-]*")
"""A relative path starting with `../`: checked against the repository root from the file's folder."""
MACHINE_PATHS = ("/work/", "/home/", "/Users/", "/root/", "/mnt/", "/scratch/")
"""Absolute paths of developer machines (this project's workspace is /work/)."""


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = []
    for name in out.decode().split("\0"):
        if not name or name.startswith(EXEMPT):
            continue
        path = REPO / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192] or name.endswith((".gz", ".bin", ".idx", ".pt")):
            continue
        files.append(path)
    return files


def outside_references(path: Path, text: str) -> list[str]:
    """'file:line: what' for each reference in `text` that leaves the repository."""
    found = []
    rel = path.relative_to(REPO)
    own_checkout = str(REPO) + "/"  # this checkout's own absolute path, wherever it was cloned (/tmp too)
    for no, line in enumerate(text.splitlines(), 1):
        for m in SHARED.finditer(line):
            found.append(f"{rel}:{no}: {m.group(0)!r} (a shared/ folder outside the repository)")
        for m in CLIMB.finditer(line):
            target = (path.parent / m.group(0)).resolve()
            if not target.is_relative_to(REPO):
                found.append(f"{rel}:{no}: {m.group(0)!r} resolves to {target}, outside the repository")
        for prefix in dict.fromkeys((own_checkout, *MACHINE_PATHS)):  # once each
            if prefix in line:
                found.append(f"{rel}:{no}: absolute path {prefix!r}... of a developer's machine")
    return found


def test_no_tracked_file_references_a_path_outside_the_repository() -> None:
    files = tracked_text_files()
    assert len(files) > 100 and REPO / "README.md" in files
    problems = [p for f in files for p in outside_references(f, f.read_text(encoding="utf-8", errors="replace"))]
    assert not problems, "references outside the repository (move the file in, or drop the reference):\n" + \
        "\n".join(problems)


@pytest.mark.parametrize("line, hits", [
    ("see `../shared/gpu/README.md`", 1),
    ("the HF anchor figures of shared/gpu/README.md", 1),
    ("cd /work/main && pytest", 1),
    ("cat ../../../etc/passwd", 1),             # from tests/: above the repository root
    ("`../step_00000001` as a pointer", 0),      # tests/../step_00000001 stays inside
    ("torch_shared/x and /dev/shm/y and .../tokenizer.json", 0),
    ("bash scripts/gpu_wheels.sh", 0),
])
def test_the_check_finds_what_it_should(line: str, hits: int) -> None:
    assert len(outside_references(REPO / "tests" / "x.py", line)) == hits, line
