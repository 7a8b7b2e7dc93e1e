"""Check that a Hugging Face model computes what our RobertaMLM computes: the gate of export and import.

The probe batch has one full-length row (every position embedding is used) and two right-padded
rows, so position ids, the key-padding mask and the tied decoder are all exercised. Both models run
in fp32 in eval mode; the check fails on any non-finite logit or a max abs difference above `atol`.

    diff = compare_logits(our_model, hf_model, probe_batch(cfg, vocab_size=1000))
"""

from __future__ import annotations

from pathlib import Path

import torch

from roberta_ds.config import ModelConfig
from roberta_ds.errors import CheckpointError, UserError
from roberta_ds.model.model import RobertaMLM


class ParityError(CheckpointError):
    """The converted model does not reproduce the source model."""


def require_transformers():
    """The `transformers` module, or a UserError that says how to get it."""
    try:
        import transformers
    except ImportError:
        raise UserError(
            "the Hugging Face check needs `transformers`: pip install 'transformers>=4.45' "
            "(or the project's `test` extra)"
        ) from None
    return transformers


def probe_batch(cfg: ModelConfig, vocab_size: int, bos_id: int = 0, eos_id: int = 2,
                seed: int = 0) -> torch.Tensor:
    """(3, max_seq_len) int64: a full-length row and two right-padded rows of random real ids
    (from the first `vocab_size` ids, avoiding the pad id), each `<s> ... </s>`."""
    T = cfg.max_seq_len
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((3, T), cfg.pad_id, dtype=torch.long)
    for row, n in enumerate((T, max(3, T // 2), min(T, 5))):
        body = torch.randint(0, vocab_size - 1, (n,), generator=g)
        ids[row, :n] = body + (body >= cfg.pad_id).long()  # skip the pad id, stay below vocab_size
        ids[row, 0], ids[row, n - 1] = bos_id, eos_id
    return ids


@torch.no_grad()
def compare_logits(ours: RobertaMLM, hf_model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Max abs difference of the full logits (every position of every row), both in fp32."""
    ours, hf_model = ours.float().eval(), hf_model.float().eval()
    a = ours.logits(ids)
    b = hf_model(input_ids=ids, attention_mask=ids.ne(ours.cfg.pad_id).long()).logits
    if a.shape != b.shape:
        raise ParityError(f"logits shapes differ: ours {tuple(a.shape)}, Hugging Face {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ParityError("non-finite logits (NaN/inf in the weights?); refusing to export a broken model")
    return float((a - b).abs().max())


def check_tied(hf_model: torch.nn.Module) -> None:
    """The loaded model's decoder must be its word embedding (same values; HF shares the tensor)."""
    dec, emb = hf_model.get_output_embeddings().weight, hf_model.get_input_embeddings().weight
    if dec.shape != emb.shape or not torch.equal(dec, emb):
        raise ParityError("the decoder weight of the loaded model is not its word embedding (tie lost)")


def check_hf_dir(out_dir: Path, ours: RobertaMLM, vocab_size: int, bos_id: int, eos_id: int,
                 atol: float) -> float:
    """Load `out_dir` with plain `AutoModelForMaskedLM.from_pretrained` (no extra arguments) and
    compare with `ours`. Returns the max abs logit difference; raises ParityError on any problem."""
    transformers = require_transformers()
    try:
        auto = transformers.AutoModelForMaskedLM
        hf_model, info = auto.from_pretrained(str(out_dir), output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - any load failure means a broken export
        raise ParityError(f"{out_dir}: transformers cannot load it ({type(e).__name__}: {e})") from None
    problems = {k: sorted(v) for k, v in info.items() if v}
    if problems:
        raise ParityError(f"{out_dir}: transformers reported {problems} while loading")
    if type(hf_model).__name__ != "RobertaForMaskedLM":
        raise ParityError(f"{out_dir}: loaded as {type(hf_model).__name__}, not RobertaForMaskedLM")
    check_tied(hf_model)
    diff = compare_logits(ours, hf_model, probe_batch(ours.cfg, vocab_size, bos_id, eos_id))
    if not diff <= atol:
        raise ParityError(f"{out_dir}: logits differ from ours by {diff:.3g} (> {atol:g})")
    return diff


def check_hf_tokenizer(out_dir: Path, tokenizer_json: Path, pad_id: int) -> None:
    """`AutoTokenizer.from_pretrained(out_dir)` must load and encode exactly as tokenizer.json does."""
    transformers = require_transformers()
    from tokenizers import Tokenizer

    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    except Exception as e:  # noqa: BLE001
        raise ParityError(f"{out_dir}: AutoTokenizer cannot load it ({type(e).__name__}: {e})") from None
    text = "Hello world! RoBERTa reads <mask> text, 123 times:\n\ttabs and  spaces."
    want = Tokenizer.from_file(str(tokenizer_json)).encode(text).ids
    got = tok(text)["input_ids"]
    if got != want:
        raise ParityError(f"{out_dir}: AutoTokenizer encodes {got[:12]}..., tokenizer.json {want[:12]}...")
    if tok.pad_token_id != pad_id:
        raise ParityError(f"{out_dir}: AutoTokenizer's pad id is {tok.pad_token_id}, the model's is {pad_id}")
    if tok.mask_token_id is None:
        raise ParityError(f"{out_dir}: the tokenizer has no mask token; fill-mask would not work")
