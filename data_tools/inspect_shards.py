"""Look inside shard sets (`roberta-ds inspect`) and check them in full (`roberta-ds verify`).

    roberta-ds inspect data/train                      # counts, per-shard table, length histograms
    roberta-ds inspect data/train --decode 0 5 --document 3 --tokenizer tok/
    roberta-ds verify data/                            # a build dir (train/ + valid/) or shard set(s)
    roberta-ds verify data/train --tokenizer tok/      # also require this tokenizer's fingerprint

`verify` runs `roberta_ds.data.shard_set.verify_set`: manifest fields, each shard's header, exact .idx and
.bin sizes, contiguous monotonic pointers, document indices (0 ... S, non-decreasing), every token
id below the vocabulary size, sizes and sha256 checksums against the manifest. The first problem
is reported with its file and the command exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from roberta_ds.data.shard_set import Manifest, check_tokenizer, open_shards, verify_set
from roberta_ds.data.shards import MANIFEST_NAME, ShardReader
from roberta_ds.data.tokenizer import decode, load_tokenizer_info
from roberta_ds.errors import UserError


def shard_sets(paths: list[str]) -> list[Path]:
    """Shard set directories named by `paths`; a build directory stands for its train/ and valid/."""
    out = []
    for p in map(Path, paths):
        if p.is_file() and p.name == MANIFEST_NAME:
            out.append(p.parent)
        elif (p / MANIFEST_NAME).is_file():
            out.append(p)
        elif p.is_dir() and any((p / s).is_dir() for s in ("train", "valid")):
            out += [p / s for s in ("train", "valid") if (p / s).is_dir()]
        elif p.is_dir() and any(p.glob("*.idx")):
            raise UserError(
                f"{p}: shards without {MANIFEST_NAME}: an unfinished build (rerun build-shards to finish it), or "
                f"shards written by another tool (`roberta-ds adopt-shards {p}/NAME ... --tokenizer tok/ --out {p}`)"
            )
        else:
            raise UserError(
                f"{p}: not a shard set (no {MANIFEST_NAME}) nor a build directory with train/ and valid/"
            )
    return out


def _histogram(lengths: np.ndarray, title: str, width: int = 40) -> list[str]:
    """Power-of-two buckets of `lengths` with counts and bars."""
    if lengths.size == 0:
        return [f"{title}: (empty)"]
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    counts = np.bincount(buckets)
    pct = np.percentile(lengths, [50, 90, 99])
    lines = [
        f"{title}: mean {lengths.mean():.1f}, p50 {pct[0]:.0f}, p90 {pct[1]:.0f}, p99 {pct[2]:.0f}, "
        f"max {int(lengths.max())}"
    ]
    top = counts.max()
    first = int(np.flatnonzero(counts)[0])
    for b, c in enumerate(counts[first:], first):
        lo, hi = 1 << b, (1 << (b + 1)) - 1
        bar = "#" * max(1 if c else 0, round(width * c / top))
        lines.append(f"  {lo:>7}-{hi:<7} {c:>11,}  {bar}")
    return lines


def _tokenizer_for(manifest: Manifest, directory: Path, given: str | None) -> Path:
    """The tokenizer to decode with: --tokenizer, else the one the manifest names, if it still matches."""
    if given:
        info = load_tokenizer_info(given)
        check_tokenizer(manifest, info.sha256, str(directory / MANIFEST_NAME))
        return info.path
    recorded = manifest.created_by.get("tokenizer")
    if recorded and Path(recorded).exists():
        info = load_tokenizer_info(recorded)
        if info.sha256 == manifest.tokenizer_sha256:
            return info.path
    raise UserError(
        f"{directory}: pass --tokenizer to decode (the tokenizer recorded in the manifest is not available)"
    )


def _locate(readers: list[ShardReader], index: int, what: str, counts: list[int]) -> tuple[int, int]:
    total = sum(counts)
    if not 0 <= index < total:
        raise UserError(f"{what} {index} out of range: the set has {total}")
    starts = np.cumsum([0, *counts])
    shard = int(np.searchsorted(starts, index, side="right")) - 1
    return shard, index - int(starts[shard])


def inspect_set(
    directory: Path, decode_seqs: list[int], decode_docs: list[int], tokenizer: str | None
) -> str:
    manifest, readers = open_shards(directory)
    lines = [
        f"{directory}: {manifest.format} v{manifest.format_version}, dtype {manifest.dtype}, "
        f"vocab {manifest.vocab_size:,}, tokenizer sha256 {manifest.tokenizer_sha256[:16]}...",
        f"  special ids: {manifest.special_ids}",
    ]
    made = {
        k: v
        for k, v in manifest.created_by.items()
        if k not in ("inputs", "split_rule", "sequence_rule", "tokenizer_sha256")
    }
    if manifest.created_by:
        n_inputs = len(manifest.created_by.get("inputs", []))
        lines.append(f"  made by: {made}" + (f" from {n_inputs} input file(s)" if n_inputs else ""))
    seqs = max(manifest.sequences, 1)
    lines.append(
        f"  {len(manifest.shards)} shard(s): {manifest.documents:,} documents, {manifest.sequences:,} sequences, "
        f"{manifest.tokens:,} tokens ({manifest.tokens / seqs:.1f} tokens/sequence, "
        f"{manifest.tokens / max(manifest.documents, 1):.1f} tokens/document)"
    )
    for info in manifest.shards:
        lines.append(
            f"    {info.name}: {info.documents:,} docs, {info.sequences:,} seqs, {info.tokens:,} tokens, "
            f".bin {info.bin_bytes:,} B, .idx {info.idx_bytes:,} B"
        )
    seq_lengths = np.concatenate([r.sequence_lengths for r in readers]) if readers else np.zeros(0, np.int32)
    doc_lengths = []
    for r in readers:
        ends = np.concatenate(([0], np.cumsum(r.sequence_lengths, dtype=np.int64)))
        doc_lengths.append(np.diff(ends[r.document_indices]))
    doc_lengths_all = np.concatenate(doc_lengths) if doc_lengths else np.zeros(0, np.int64)
    lines += _histogram(seq_lengths.astype(np.int64), "sequence length (tokens)")
    lines += _histogram(doc_lengths_all, "document length (tokens)")
    if decode_seqs or decode_docs:
        tok = _tokenizer_for(manifest, directory, tokenizer)
        seq_counts = [len(r) for r in readers]
        for i in decode_seqs:
            s, j = _locate(readers, i, "sequence", seq_counts)
            ids = readers[s][j]
            lines.append(
                f"sequence {i} ({manifest.shards[s].name} #{j}, {len(ids)} tokens): {decode(tok, ids)!r}"
            )
            lines.append(f"  ids: {ids.tolist()}")
        doc_counts = [r.num_documents for r in readers]
        for d in decode_docs:
            s, j = _locate(readers, d, "document", doc_counts)
            parts = readers[s].document(j)
            text = "".join(decode(tok, p) for p in parts)
            lines.append(f"document {d} ({manifest.shards[s].name} #{j}, {len(parts)} sequences): {text!r}")
    return "\n".join(lines)


def inspect_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="roberta-ds inspect", description="Counts, length histograms, decoded sequences."
    )
    p.add_argument(
        "paths", nargs="+", help="shard set directories (or a build directory with train/ and valid/)"
    )
    p.add_argument(
        "--decode", type=int, nargs="*", default=[], metavar="I", help="decode sequence(s) I (0-based)"
    )
    p.add_argument(
        "--document", type=int, nargs="*", default=[], metavar="D", help="decode whole document(s) D"
    )
    p.add_argument("--tokenizer", help="tokenizer to decode with (default: the one recorded in the manifest)")
    args = p.parse_args(argv)
    for directory in shard_sets(args.paths):
        print(inspect_set(directory, args.decode, args.document, args.tokenizer))
    return 0


def verify_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="roberta-ds verify", description="Full integrity check of shard sets.")
    p.add_argument(
        "paths", nargs="+", help="shard set directories (or a build directory with train/ and valid/)"
    )
    p.add_argument("--tokenizer", help="also require that the sets were made with this tokenizer")
    args = p.parse_args(argv)
    fingerprint = load_tokenizer_info(args.tokenizer).sha256 if args.tokenizer else None
    for directory in shard_sets(args.paths):
        m = verify_set(directory, fingerprint)
        listed = {f"{s.name}{ext}" for s in m.shards for ext in (".bin", ".idx")} | {MANIFEST_NAME}
        stray = sorted(f.name for f in directory.iterdir() if f.name not in listed)
        print(
            f"OK {directory}: {len(m.shards)} shard(s), {m.documents:,} documents, {m.sequences:,} sequences, "
            f"{m.tokens:,} tokens"
        )
        if stray:
            print(f"  note: files not in the manifest (ignored by readers): {stray[:10]}", file=sys.stderr)
    return 0
