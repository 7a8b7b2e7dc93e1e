"""Concatenate shard sets made with the same tokenizer into one set (`roberta-ds merge`).

    roberta-ds merge --out data/all/train wiki/train books/train

The output set lists the input sets' shards in order, renamed `shard-00000`, `shard-00001`, ...
Each shard is copied to a temp name while its sha256 is computed, checked against the source
manifest (a corrupt source is refused, never propagated) and renamed; the manifest is written
last. Sets made with different tokenizers (fingerprints), vocabulary sizes, special ids or token
dtypes are refused. To weight corpora instead of concatenating them, list the sets as separate
data sources in the training config.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from data_tools.build_shards import shard_name
from roberta_ds.data.shard_set import Manifest, ShardInfo, open_shards, write_manifest
from roberta_ds.data.shards import MANIFEST_NAME, ShardFormatError, bin_path, idx_path
from roberta_ds.data.unigram import with_token_stats
from roberta_ds.durable import fsync_dir
from roberta_ds.errors import UserError


def _copy_checked(src: Path, dst: Path, size: int, sha256: str) -> None:
    """Copy `src` to `dst` via a temp name, refusing it if its size or sha256 differ from the manifest's."""
    tmp = dst.with_name(dst.name + ".tmp")
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(1 << 22):
                h.update(block)
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
        if tmp.stat().st_size != size or h.hexdigest() != sha256:
            raise ShardFormatError(
                f"{src}: size or sha256 differs from its manifest (corrupt since it was written); "
                "run `roberta-ds verify` on it and rebuild"
            )
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def merge_shard_sets(sets: Sequence[str | Path], out_dir: str | Path) -> Manifest:
    """Write the concatenation of `sets` to `out_dir` (a new shard set); returns its manifest."""
    if len(sets) < 1:
        raise UserError("merge: give at least one input shard set")
    out = Path(out_dir)
    if (out / MANIFEST_NAME).exists():
        raise UserError(f"{out}: already a shard set; merge into a new directory")
    sources: list[tuple[Path, Manifest]] = []
    for s in map(Path, sets):
        if not (s / MANIFEST_NAME).is_file() and (s / "train" / MANIFEST_NAME).is_file():
            raise UserError(
                f"{s}: is a build directory; pass its shard sets ({s / 'train'}, {s / 'valid'}) separately"
            )
        manifest, _ = open_shards(s)  # manifest valid, files present with the recorded sizes
        if s.resolve() == out.resolve():
            raise UserError(f"{s}: the output directory cannot also be an input")
        sources.append((s, manifest))
    first_dir, first = sources[0]
    for d, m in sources[1:]:
        for field, a, b in (
            ("tokenizer fingerprint", first.tokenizer_sha256, m.tokenizer_sha256),
            ("vocab size", first.vocab_size, m.vocab_size),
            ("special ids", first.special_ids, m.special_ids),
            ("token dtype", first.dtype, m.dtype),
        ):
            if a != b:
                raise UserError(
                    f"merge: {d} and {first_dir} differ in {field} ({str(b)[:16]} vs {str(a)[:16]}); only sets "
                    "made with the same tokenizer can be merged (re-tokenize one of them)"
                )
    out.mkdir(parents=True, exist_ok=True)
    shards: list[ShardInfo] = []
    for d, m in sources:
        for info in m.shards:
            name = shard_name(len(shards))
            src, dst = d / info.name, out / name
            _copy_checked(bin_path(src), bin_path(dst), info.bin_bytes, info.bin_sha256)
            _copy_checked(idx_path(src), idx_path(dst), info.idx_bytes, info.idx_sha256)
            shards.append(ShardInfo(**{**info.__dict__, "name": name}))
    fsync_dir(out)
    manifest = Manifest(
        tokenizer_sha256=first.tokenizer_sha256,
        vocab_size=first.vocab_size,
        special_ids=dict(first.special_ids),
        dtype=first.dtype,
        shards=tuple(shards),
        created_by={
            "command": "roberta-ds merge",
            "sources": [
                {"path": str(d.resolve()), "shards": len(m.shards), "created_by": m.created_by}
                for d, m in sources
            ],
        },
    )
    manifest = with_token_stats(out, manifest)
    write_manifest(out, manifest)
    return manifest


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="roberta-ds merge", description="Concatenate shard sets made with the same tokenizer."
    )
    p.add_argument("sets", nargs="+", help="input shard set directories, in order")
    p.add_argument("--out", required=True, help="new shard set directory")
    args = p.parse_args(argv)
    m = merge_shard_sets(args.sets, args.out)
    print(
        f"{args.out}: {len(m.shards)} shard(s), {m.documents:,} documents, {m.sequences:,} sequences, {m.tokens:,} tokens"
    )
    return 0
