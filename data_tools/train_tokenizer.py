"""Train a RoBERTa byte-level BPE tokenizer, or adopt an existing tokenizer.json.

    roberta-ds tokenizer --out tok/ corpus/*.jsonl.gz [--vocab-size 50265] [--min-frequency 2]
    roberta-ds tokenizer --out tok/ --from /path/to/roberta-base/tokenizer.json

Training streams documents (txt / JSONL / .gz, see data_tools.text_input) into the `tokenizers`
BPE trainer, so the corpus is never held in memory. The model is RoBERTa's: byte-level
pre-tokenizer without a prefix space, byte-level decoder, BPE without an unknown token, special
tokens <s>=0 <pad>=1 </s>=2 <unk>=3 and <mask> last (vocab_size - 1: 50264 for the full 50,265 ids),
as in roberta-base, and `<s> X </s>` post-processing.

The output directory holds what `transformers.AutoTokenizer.from_pretrained(dir)` needs to give a
RoBERTa fast tokenizer: tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and
special_tokens_map.json. tokenizer.json is written last (each file atomically), so a directory with
one is complete; its sha256 is the tokenizer's fingerprint in shard manifests and checkpoints.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from data_tools.text_input import ReadStats, iter_documents, resolve_inputs
from roberta_ds.data.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, load_tokenizer_info, special_ids_of
from roberta_ds.durable import atomic_write_bytes
from roberta_ds.errors import UserError
from roberta_ds.hf.tokenizer import roberta_config_files

MIN_VOCAB = 512
"""256 byte symbols + 5 specials leave too little room for merges below this."""


def _write_tokenizer_dir(tok, out_dir: Path, tokenizer_json: bytes) -> Path:
    """Write the full file set; tokenizer.json last, so its presence means complete."""
    from tokenizers.models import BPE

    out_dir.mkdir(parents=True, exist_ok=True)
    if not isinstance(tok.model, BPE):
        raise UserError(f"the tokenizer's model is {type(tok.model).__name__}; RoBERTa needs byte-level BPE")
    special_ids_of(tok, out_dir)  # refuses a tokenizer without RoBERTa's special tokens
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".vocab-") as tmp:
        tok.model.save(tmp)  # vocab.json + merges.txt, the slow-tokenizer files
        files = {name: (Path(tmp) / name).read_bytes() for name in ("vocab.json", "merges.txt")}
    files.update(roberta_config_files())
    for name, data in files.items():
        atomic_write_bytes(out_dir / name, data)
    path = out_dir / TOKENIZER_FILE
    atomic_write_bytes(path, tokenizer_json)
    return path


def build_untrained_tokenizer():
    """RoBERTa's byte-level BPE pipeline with an empty model."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        (SPECIAL_TOKENS["eos"], 2), (SPECIAL_TOKENS["bos"], 0), trim_offsets=True, add_prefix_space=False
    )
    return tok


def with_mask_last(tok):
    """`tok` with <mask> appended as its last id, in the BPE vocabulary (so vocab.json, the slow
    tokenizer's file, has it too, as roberta-base's does) and as a special added token that takes
    the space before it (lstrip: "is <mask>." masks the word with its space, like RoBERTa's)."""
    import json

    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    mask_id = max(vocab.values()) + 1
    vocab[SPECIAL_TOKENS["mask"]] = mask_id
    data["added_tokens"].append({
        "id": mask_id, "content": SPECIAL_TOKENS["mask"], "single_word": False, "lstrip": True,
        "rstrip": False, "normalized": False, "special": True,
    })
    return Tokenizer.from_str(json.dumps(data))


def train_tokenizer(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    vocab_size: int = 50265,
    min_frequency: int = 2,
    text_field: str = "text",
    on_decode_error: str = "strict",
) -> Path:
    """Train byte-level BPE on `inputs` and write the tokenizer directory; returns its tokenizer.json."""
    from tokenizers import AddedToken, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise UserError(
            f"--vocab-size: must be >= {MIN_VOCAB} (256 byte symbols + specials + merges), got {vocab_size}"
        )
    if vocab_size > 1 << 31:
        raise UserError(f"--vocab-size: {vocab_size} does not fit int32 token ids")
    if min_frequency < 1:
        raise UserError(f"--min-frequency: must be >= 1, got {min_frequency}")
    files = resolve_inputs(inputs)
    tok = build_untrained_tokenizer()
    # <s> <pad> </s> <unk> first (the trainer gives them ids 0-3, in order); <mask> is appended after
    # training so that it takes the last id, as in roberta-base (50264 of 50265).
    specials = [AddedToken(SPECIAL_TOKENS[r], special=True, normalized=False) for r in ("bos", "pad", "eos", "unk")]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stats = ReadStats()
    tok.train_from_iterator(
        iter_documents(files, text_field=text_field, on_decode_error=on_decode_error, stats=stats), trainer
    )
    if stats.documents == 0:
        raise UserError(
            f"no usable documents in {len(files)} input file(s) ({stats.skipped_empty} empty or "
            "whitespace-only skipped); nothing to train on"
        )
    tok = with_mask_last(tok)
    ids = special_ids_of(tok, out_dir)
    expected = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": tok.get_vocab_size(with_added_tokens=True) - 1}
    if ids != expected:  # the trainer puts special tokens first, in order; guard against that changing
        raise UserError(f"internal: trained special ids {ids} differ from {expected}")
    return _write_tokenizer_dir(tok, Path(out_dir), tok.to_str(pretty=True).encode("utf-8"))


def adopt_tokenizer(tokenizer_json: str | Path, out_dir: str | Path) -> Path:
    """Take an existing tokenizer.json (e.g. roberta-base's) as is and write the same file set.

    The bytes of tokenizer.json are copied unchanged, so the fingerprint stays that of the source.
    Refuses a tokenizer without RoBERTa's five special tokens or one that is not BPE.
    """
    src = Path(tokenizer_json)
    if src.is_dir():
        src = src / TOKENIZER_FILE
    load_tokenizer_info(src)  # clear error when missing / invalid / lacking specials
    from tokenizers import Tokenizer

    data = src.read_bytes()
    tok = Tokenizer.from_str(data.decode("utf-8"))
    out = Path(out_dir)
    if out.resolve() == src.parent.resolve():
        raise UserError(f"--out: {out} is the directory of the tokenizer being adopted; choose another")
    return _write_tokenizer_dir(tok, out, data)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="roberta-ds tokenizer",
        description="Train a RoBERTa byte-level BPE tokenizer from text/JSONL/.gz files, or adopt a tokenizer.json.",
    )
    p.add_argument("inputs", nargs="*", help="training files or directories (txt, jsonl, .gz of either)")
    p.add_argument(
        "--out", required=True, help="output directory (tokenizer.json, vocab.json, merges.txt, ...)"
    )
    p.add_argument("--from", dest="from_json", help="adopt this existing tokenizer.json instead of training")
    p.add_argument("--vocab-size", type=int, default=50265)
    p.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen at least this often")
    p.add_argument("--text-field", default="text", help="JSONL field holding the document (default: text)")
    p.add_argument("--on-decode-error", choices=("strict", "replace"), default="strict")
    args = p.parse_args(argv)
    if args.from_json:
        if args.inputs:
            raise UserError("give either training inputs or --from, not both")
        path = adopt_tokenizer(args.from_json, args.out)
    else:
        if not args.inputs:
            raise UserError("no training inputs given (or pass --from tokenizer.json to adopt one)")
        path = train_tokenizer(
            args.inputs, args.out, args.vocab_size, args.min_frequency, args.text_field, args.on_decode_error
        )
    info = load_tokenizer_info(path)
    print(
        f"wrote {path.parent}: vocab {info.vocab_size}, specials {info.special_ids}, sha256 {info.sha256[:16]}"
    )
    return 0
