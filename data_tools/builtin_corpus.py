"""The built-in corpus: docstrings (and comments) of the running Python's standard library, as JSONL.

Real English prose that every machine with Python has, so the quickstart and the tests need no
download. Source files are parsed with `ast` (never imported: importing runs code and some stdlib
modules only import on some platforms), in sorted path order; every module, class and function
docstring of at least `min_chars` characters, cleaned with `inspect.cleandoc` and de-duplicated, is
one document. CPython 3.11 gives about 2,300 documents and 1.25 MB of text.

With `comments=True` (the quickstart's corpus) each file's comment blocks follow its docstrings:
runs of whole-line `#` comments on consecutive lines, read with `tokenize` (so a `#` inside a string
is no comment), one document per block, lines of a paragraph joined with spaces and a bare `#`
starting a new line; blocks shorter than `min_chars` or under 60% letters (commented-out code,
tables) are left out. At min_chars 40, CPython 3.11 gives about 14,100 documents and 2.65 MB.

    python -m data_tools.builtin_corpus OUT_DIR [--comments]   # OUT_DIR/stdlib-*-0{0..3}.jsonl
"""

from __future__ import annotations

import ast
import io
import json
import os
import sys
import sysconfig
import tokenize
import warnings
from collections import deque
from pathlib import Path

from roberta_ds.durable import atomic_write_bytes

NUM_FILES = 4
"""Several files so the multi-file and multi-worker paths of build_shards run on it."""
SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings"}
)
"""Installed packages, test suites, and codec tables (10% of the parse time for 0.4% of the prose)."""
DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
STATEMENT_NODES = (ast.stmt, ast.excepthandler, ast.match_case)


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """Every `.py` file of the standard library (tests and installed packages excluded), sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        found += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return found


def docstrings(source: bytes, min_chars: int) -> list[str]:
    """Cleaned docstrings of at least `min_chars` characters, in `ast.walk` (breadth-first) order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old modules are not our business
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return []
    out = []
    # Breadth-first like ast.walk, but through statements only: definitions live only inside
    # statements, and skipping the expressions (95% of the nodes) makes this 20x cheaper.
    queue: deque[ast.AST] = deque([tree])
    while queue:
        node = queue.popleft()
        queue.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, STATEMENT_NODES))
        if isinstance(node, DOCSTRING_NODES):
            doc = ast.get_docstring(node, clean=True)  # clean=True is inspect.cleandoc
            if doc and len(doc) >= min_chars:
                out.append(doc)
    return out


MIN_LETTERS = 0.6
"""Share of letters a comment block needs to count as prose."""


def comment_blocks(source: bytes, min_chars: int) -> list[str]:
    """Prose comment blocks of a source file, in file order (see the module docstring)."""
    blocks: list[list[str]] = []
    last_line = -2
    try:
        for tok in tokenize.tokenize(io.BytesIO(source).readline):
            if tok.type != tokenize.COMMENT or not tok.line.lstrip().startswith("#"):
                continue  # a comment after code on its line is left out
            text = tok.string.lstrip("#").strip()
            if tok.start[0] != last_line + 1 or not blocks:
                blocks.append([])
            blocks[-1].append(text)
            last_line = tok.start[0]
    except (tokenize.TokenError, SyntaxError, UnicodeDecodeError):
        pass  # the blocks read so far stand; a file tokenize cannot read gives no more
    out = []
    for lines in blocks:
        text = "\n".join(" ".join(p.split()) for p in " ".join(x or "\n" for x in lines).split("\n")).strip()
        if len(text) >= min_chars and sum(c.isalpha() for c in text) >= MIN_LETTERS * len(text):
            out.append(text)
    return out


def builtin_documents(min_chars: int = 200, comments: bool = False) -> list[str]:
    """All documents of the built-in corpus, in a fixed order, without duplicates: per source file its
    docstrings, then (with `comments`) its comment blocks."""
    seen: set[str] = set()
    docs = []
    for path in stdlib_sources():
        source = path.read_bytes()
        for doc in docstrings(source, min_chars) + (comment_blocks(source, min_chars) if comments else []):
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


def write_builtin_corpus(out_dir: Path, min_chars: int = 200, comments: bool = False) -> list[Path]:
    """Write the built-in corpus as NUM_FILES JSONL files (`{"text": ...}` per line) in `out_dir`.

    Documents are dealt to files in contiguous runs, so reading the files in order gives the
    corpus order. Each file is written atomically. Returns the file paths, in order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = builtin_documents(min_chars, comments)
    per_file = -(-len(docs) // NUM_FILES)
    paths = []
    name = "stdlib-docstrings-comments" if comments else "stdlib-docstrings"
    for i in range(NUM_FILES):
        part = docs[i * per_file : (i + 1) * per_file]
        lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in part)
        path = out_dir / f"{name}-{i:02d}.jsonl"
        atomic_write_bytes(path, lines.encode("utf-8"))
        paths.append(path)
    return paths


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--comments"]
    if len(args) != 1:
        sys.exit("usage: python -m data_tools.builtin_corpus OUT_DIR [--comments]")
    with_comments = "--comments" in sys.argv[1:]
    for p in write_builtin_corpus(Path(args[0]), **({"min_chars": 40, "comments": True} if with_comments else {})):
        print(p)
