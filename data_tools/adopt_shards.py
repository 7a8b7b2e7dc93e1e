"""Adopt `.bin/.idx` shards written by other tools (megatron-core's IndexedDatasetBuilder, Megatron-LM's
tools/preprocess_data.py) as a roberta-ds shard set, without copying them.

    roberta-ds adopt-shards corpus/wiki_text_sentence corpus/books_text_sentence --tokenizer tok/ --out corpus/

The byte layout is the same as ours (roberta_ds/data/shards.py), so what a foreign shard lacks is our
manifest: the tokenizer it was made with, the vocabulary, the special ids and checksums. This command
verifies each shard in full against the tokenizer given, then writes `manifest.json` next to the
shards (atomically, last), after which `roberta-ds train`, `verify` and `inspect` take the directory
like a set of ours. Refused, naming the file and the fix:

- a shard that fails the format checks (header, sizes, pointers, document indices), or has no
  sequences or no document boundaries (a builder that never called `end_document()`);
- a token id at or above the tokenizer's vocabulary (shards made with another tokenizer);
- `<s>`, `</s>`, `<pad>` or `<mask>` ids inside the data: our packer puts `<s> ... </s>` around each
  block itself, so Megatron's `--append-eod` output would train with doubled separators;
- a token dtype a manifest cannot name for this vocabulary (ours: uint16 up to 65,536 ids, or int32),
  or shards of different dtypes;
- shards outside `--out` (the manifest names shards relative to its directory; nothing is copied or
  linked) and a directory that already holds a manifest.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from roberta_ds.data.shard_set import Manifest, shard_info, verify_shard, write_manifest
from roberta_ds.data.shards import MANIFEST_NAME, ShardReader, bin_path, idx_path, token_dtype
from roberta_ds.data.tokenizer import SPECIAL_TOKENS, TokenizerInfo, load_tokenizer_info
from roberta_ds.data.unigram import UnigramStats
from roberta_ds.errors import ShardFormatError, UserError

IN_DATA_REFUSED = ("bos", "eos", "pad", "mask")
"""Special ids that a shard of ours never holds (the packer adds <s>/</s>; pad and mask are the trainer's)."""


def shard_prefix(arg: str | Path) -> Path:
    """`dir/name`, `dir/name.bin` or `dir/name.idx` -> `dir/name`, with both files present."""
    p = Path(arg)
    if p.suffix in (".bin", ".idx"):
        p = p.with_suffix("")
    missing = [str(f) for f in (bin_path(p), idx_path(p)) if not f.is_file()]
    if missing:
        raise UserError(f"{arg}: no shard there ({', '.join(missing)} missing); pass the prefix of a .bin/.idx pair")
    return p


def _counts(prefix: Path, vocab_size: int) -> np.ndarray:
    """(vocab_size,) token counts of one verified shard (ids already checked below vocab_size)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for _, tokens in ShardReader(prefix).iter_token_chunks():
        counts += np.bincount(tokens, minlength=vocab_size)
    return counts


def check_foreign_shard(prefix: Path, tok: TokenizerInfo, tokenizer_arg: str) -> np.ndarray:
    """Verify one foreign shard against the tokenizer; returns its token counts."""
    reader = ShardReader(prefix)  # header: magic, version, integer dtype, exact .idx size
    ipath, bpath = idx_path(prefix), bin_path(prefix)
    if len(reader) == 0:
        raise UserError(f"{ipath}: holds no sequences; nothing to adopt (drop it from the list)")
    if reader.num_documents == 0:
        raise UserError(
            f"{ipath}: no document boundaries (document indices {reader.document_indices.tolist()[:3]} for "
            f"{len(reader)} sequences): the builder never called end_document(); rebuild it with one call "
            "per document (megatron-core's IndexedDatasetBuilder.end_document or add_document)"
        )
    try:
        verify_shard(prefix, vocab_size=tok.vocab_size)
    except ShardFormatError as e:
        if "outside the vocabulary" not in str(e):
            raise
        raise UserError(
            f"{e} of --tokenizer {tokenizer_arg}: this shard was made with another tokenizer; pass the "
            "tokenizer it was made with, or re-tokenize its text with `roberta-ds build-shards`"
        ) from None
    counts = _counts(prefix, tok.vocab_size)
    for role in IN_DATA_REFUSED:
        i = tok.special_ids[role]
        if counts[i]:
            where = next(start + int(np.flatnonzero(part == i)[0])
                         for start, part in reader.iter_token_chunks() if (part == i).any())
            seq = int(np.searchsorted(reader.token_offsets(), where, side="right")) - 1
            raise UserError(
                f"{bpath}: holds {SPECIAL_TOKENS[role]} (id {i}) {int(counts[i]):,} time(s), first in sequence "
                f"{seq}; roberta-ds puts <s> ... </s> around each block itself and never stores special ids "
                "(Megatron's preprocess_data.py --append-eod writes them): re-run it without --append-eod"
            )
    return counts


def adopt_shards(prefixes: Sequence[str | Path], tokenizer: str | Path, out: str | Path,
                 log=print) -> Manifest:
    """Verify `prefixes` against `tokenizer` and write the manifest that makes `out` a shard set."""
    if not prefixes:
        raise UserError("adopt-shards: give at least one shard prefix (dir/name of a .bin/.idx pair)")
    out = Path(out)
    if (out / MANIFEST_NAME).exists():
        raise UserError(f"--out {out}: already holds {MANIFEST_NAME} (a shard set); nothing to adopt there")
    tok = load_tokenizer_info(tokenizer)
    paths = [shard_prefix(p) for p in prefixes]
    for p in paths:
        if not out.is_dir() or p.parent.resolve() != out.resolve():
            raise UserError(
                f"{p}: not in --out {out}; the manifest goes next to the shards and names them relative to its "
                f"directory (nothing is copied): pass --out {p.parent}, or move the .bin/.idx pairs into one "
                "directory first"
            )
    names = [p.name for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"adopt-shards: shard(s) {dupes} given more than once")
    dtypes = {p: ShardReader(p).dtype for p in paths}
    allowed = {token_dtype(tok.vocab_size), np.dtype(np.int32)}
    for p, dt in dtypes.items():
        if dt not in allowed:
            raise UserError(
                f"{idx_path(p)}: token dtype {dt}; a manifest for a {tok.vocab_size:,}-id vocabulary names "
                f"{' or '.join(sorted(d.name for d in allowed))}: rebuild the shard with that dtype "
                "(megatron-core: DType.optimal_dtype(vocab_size))"
            )
    if len(set(dtypes.values())) > 1:
        raise UserError(
            f"adopt-shards: the shards mix token dtypes ({', '.join(f'{p.name}: {d}' for p, d in dtypes.items())}); "
            "a set has one: adopt them as separate sets, or rebuild them with one dtype"
        )
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for p in paths:
        counts += check_foreign_shard(p, tok, str(tokenizer))
        log(f"  {p.name}: verified")
    stats = UnigramStats.from_counts(counts, tok.special_ids)
    manifest = Manifest(
        tokenizer_sha256=tok.sha256,
        vocab_size=tok.vocab_size,
        special_ids=dict(tok.special_ids),
        dtype=next(iter(dtypes.values())).name,
        shards=tuple(shard_info(p) for p in paths),  # checksums of the bytes just verified
        created_by={"command": "roberta-ds adopt-shards", "shards": names, "tokenizer": str(tok.path)},
        token_stats=stats.to_manifest(),
    )
    write_manifest(out, manifest)
    return manifest


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="roberta-ds adopt-shards",
        description="Verify .bin/.idx shards written by Megatron's tools and write our manifest next to them.",
    )
    p.add_argument("prefixes", nargs="+", help="shard prefixes (dir/name of each .bin/.idx pair), in order")
    p.add_argument("--tokenizer", required=True, help="the tokenizer directory (or tokenizer.json) they were made with")
    p.add_argument("--out", required=True, help="the directory holding the shards; manifest.json is written there")
    args = p.parse_args(argv)
    m = adopt_shards(args.prefixes, args.tokenizer, args.out, log=lambda s: print(s, file=sys.stderr))
    print(f"{args.out}: adopted {len(m.shards)} shard(s), {m.documents:,} documents, {m.sequences:,} sequences, "
          f"{m.tokens:,} tokens ({m.dtype}); train on it with data.train={args.out}")
    return 0
