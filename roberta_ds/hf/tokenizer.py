"""The Hugging Face side of a tokenizer directory: what `AutoTokenizer` needs next to tokenizer.json.

A RoBERTa tokenizer for us is a `tokenizer.json` (byte-level BPE with <s> <pad> </s> <unk> <mask>;
its sha256 is the fingerprint in manifests and checkpoints). transformers loads it as a RoBERTa fast
tokenizer when `tokenizer_config.json` names the class and the special tokens:

- `roberta-ds tokenizer` writes tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and
  special_tokens_map.json (`roberta_config_files` makes the last two);
- transformers' `save_pretrained` writes tokenizer.json and tokenizer_config.json (4.x also the rest);
- a directory may hold tokenizer.json alone.

`export_files` takes any of these for `export-hf --tokenizer`: tokenizer.json's bytes unchanged,
the other files as given, and RoBERTa's tokenizer_config.json / special_tokens_map.json where the
directory has no tokenizer_config.json. A directory whose own config makes `AutoTokenizer` load
something else (no pad or mask token, a slow class) is refused, naming what is missing and how to
adopt its tokenizer.json (`roberta-ds tokenizer --from`, which keeps the fingerprint).
"""

from __future__ import annotations

import json
from pathlib import Path

from roberta_ds.data.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE
from roberta_ds.errors import UserError

MODEL_MAX_LENGTH = 512
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
OPTIONAL_FILES = (CONFIG_FILE, SPECIAL_MAP_FILE, "vocab.json", "merges.txt")
"""Carried into an export when the tokenizer directory has them (tokenizer.json always is)."""


def roberta_config_files() -> dict[str, bytes]:
    """tokenizer_config.json and special_tokens_map.json of a RoBERTa fast tokenizer (they name the
    special tokens; their ids come from tokenizer.json)."""
    mask = {
        "content": SPECIAL_TOKENS["mask"],
        "lstrip": True,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    special_map = {
        "bos_token": SPECIAL_TOKENS["bos"],
        "eos_token": SPECIAL_TOKENS["eos"],
        "unk_token": SPECIAL_TOKENS["unk"],
        "sep_token": SPECIAL_TOKENS["eos"],
        "pad_token": SPECIAL_TOKENS["pad"],
        "cls_token": SPECIAL_TOKENS["bos"],
        "mask_token": mask,
    }
    config = {
        # "RobertaTokenizer" resolves to the fast (tokenizers-backed) class in transformers 4.x
        # (AutoTokenizer prefers fast) and 5.x (where RobertaTokenizerFast is an alias of it).
        "tokenizer_class": "RobertaTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "add_prefix_space": False,
        "trim_offsets": True,
        "errors": "replace",
        **special_map,
    }

    def dump(obj: dict) -> bytes:
        return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()

    return {CONFIG_FILE: dump(config), SPECIAL_MAP_FILE: dump(special_map)}


def _adopt_hint(tok_dir: Path) -> str:
    return ("adopt its tokenizer.json, which keeps the fingerprint and adds RoBERTa's tokenizer files: "
            f"`roberta-ds tokenizer --out tok/ --from {tok_dir / TOKENIZER_FILE}`, then pass "
            "--tokenizer tok/")


def check_auto_tokenizer(tok_dir: Path, special_ids: dict[str, int]) -> None:
    """`AutoTokenizer.from_pretrained(tok_dir)` must give a fast tokenizer whose <s>, <pad>, </s> and
    <mask> are tokenizer.json's; else UserError naming what differs and how to adopt it."""
    from roberta_ds.hf.parity import require_transformers

    transformers = require_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad directory
        raise UserError(f"--tokenizer {tok_dir}: AutoTokenizer cannot load it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); {_adopt_hint(tok_dir)}") from None
    problems = [] if tok.is_fast else ["it is not a fast (tokenizers-backed) tokenizer"]
    for role, attr in (("bos", "bos_token_id"), ("pad", "pad_token_id"), ("eos", "eos_token_id"),
                       ("mask", "mask_token_id")):
        got = getattr(tok, attr, None)
        if got != special_ids[role]:
            problems.append(f"{attr} is {got}, but {SPECIAL_TOKENS[role]} is id {special_ids[role]} in "
                            f"{TOKENIZER_FILE}")
    if problems:
        raise UserError(f"--tokenizer {tok_dir}: AutoTokenizer loads it as {type(tok).__name__} and "
                        f"{'; '.join(problems)}: not a RoBERTa-style fast tokenizer ({CONFIG_FILE} says "
                        f"otherwise); {_adopt_hint(tok_dir)}")


def require_tokenizer_json(tok_dir: Path) -> Path:
    """`tok_dir`/tokenizer.json, or UserError saying what is missing and how to adopt a tokenizer."""
    if not tok_dir.is_dir():
        raise UserError(f"--tokenizer {tok_dir}: not a directory; pass the tokenizer directory the model "
                        "was trained with (a run keeps a copy in <output_dir>/tokenizer)")
    if not (tok_dir / TOKENIZER_FILE).is_file():
        present = sorted(p.name for p in tok_dir.iterdir())
        raise UserError(f"--tokenizer {tok_dir}: no {TOKENIZER_FILE} (it holds {present}); export-hf needs "
                        f"the fast tokenizer the model was trained with, whose {TOKENIZER_FILE} sha256 the "
                        "checkpoint records. To adopt a tokenizer.json from elsewhere: "
                        "`roberta-ds tokenizer --out tok/ --from PATH/tokenizer.json`")
    return tok_dir / TOKENIZER_FILE


def export_files(tok_dir: Path, special_ids: dict[str, int]) -> dict[str, bytes]:
    """{file name: bytes} of the tokenizer an export carries (see the module docstring); `special_ids`
    are tokenizer.json's (tokenizer.TokenizerInfo.special_ids)."""
    require_tokenizer_json(tok_dir)
    files = {TOKENIZER_FILE: (tok_dir / TOKENIZER_FILE).read_bytes()}
    files.update({name: (tok_dir / name).read_bytes()
                  for name in OPTIONAL_FILES if (tok_dir / name).is_file()})
    if CONFIG_FILE in files:
        check_auto_tokenizer(tok_dir, special_ids)
    else:
        files.update(roberta_config_files())
    return files
