"""The one map between our RobertaMLM and Hugging Face's `RobertaForMaskedLM`: names, tensors, config.

Everything that differs between the two layouts is a row in a table below; `to_hf` and `from_hf`
only walk the tables, so there is no string surgery anywhere else.

- `GLOBAL_NAMES` / `LAYER_NAMES`: our name -> HF name(s). One HF name is a rename. Several HF names
  mean our tensor is their concatenation along dim 0 (the fused QKV projection: rows [q; k; v]).
- `HF_TIED`: HF names that are the same tensor as another HF name (RoBERTa ties the decoder to the
  word embedding, and the decoder bias to `lm_head.bias`). `to_hf` emits them so a strict
  `load_state_dict` works; files leave them out, as HF's `save_pretrained` does; `from_hf` refuses
  a checkpoint where they differ (untied weights cannot be represented by our model).
- `HF_IGNORED`: HF names we read past, each with the reason; callers print them, never drop silently.
- `WRAPPER_PREFIXES` / `strip_wrappers` (defined in checkpoint/read_weights.py, which needs them
  before any HF name exists): prefixes wrappers put on our names (torch.compile `_orig_mod.`, DDP `module.`).
- `CONFIG_NAMES` / `HF_FIXED`: ModelConfig field <-> RobertaConfig field, and the RobertaConfig
  values our architecture implies.

    from roberta_ds.hf.names import to_hf, from_hf
    hf_state = to_hf(model.state_dict())            # -> RobertaForMaskedLM.load_state_dict(hf_state)
    ours = from_hf(hf_model.state_dict())
"""

from __future__ import annotations

import re
from typing import Any

import torch

from roberta_ds.checkpoint.read_weights import WRAPPER_PREFIXES, strip_wrappers  # noqa: F401 - part of the map's API
from roberta_ds.config import ModelConfig
from roberta_ds.errors import CheckpointError, ConfigError

_L = "roberta.encoder.layer.{i}."
_QKV = ("query", "key", "value")  # the row order of our fused projection

GLOBAL_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("embeddings.word.weight", ("roberta.embeddings.word_embeddings.weight",)),
    ("embeddings.position.weight", ("roberta.embeddings.position_embeddings.weight",)),
    ("embeddings.token_type.weight", ("roberta.embeddings.token_type_embeddings.weight",)),
    ("embeddings.norm.weight", ("roberta.embeddings.LayerNorm.weight",)),
    ("embeddings.norm.bias", ("roberta.embeddings.LayerNorm.bias",)),
    ("head.dense.weight", ("lm_head.dense.weight",)),
    ("head.dense.bias", ("lm_head.dense.bias",)),
    ("head.norm.weight", ("lm_head.layer_norm.weight",)),
    ("head.norm.bias", ("lm_head.layer_norm.bias",)),
    ("head.bias", ("lm_head.bias",)),
)

LAYER_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("layers.{i}.attn.qkv.weight", tuple(f"{_L}attention.self.{p}.weight" for p in _QKV)),
    ("layers.{i}.attn.qkv.bias", tuple(f"{_L}attention.self.{p}.bias" for p in _QKV)),
    ("layers.{i}.attn.proj.weight", (f"{_L}attention.output.dense.weight",)),
    ("layers.{i}.attn.proj.bias", (f"{_L}attention.output.dense.bias",)),
    ("layers.{i}.attn_norm.weight", (f"{_L}attention.output.LayerNorm.weight",)),
    ("layers.{i}.attn_norm.bias", (f"{_L}attention.output.LayerNorm.bias",)),
    ("layers.{i}.ffn.fc.weight", (f"{_L}intermediate.dense.weight",)),
    ("layers.{i}.ffn.fc.bias", (f"{_L}intermediate.dense.bias",)),
    ("layers.{i}.ffn.proj.weight", (f"{_L}output.dense.weight",)),
    ("layers.{i}.ffn.proj.bias", (f"{_L}output.dense.bias",)),
    ("layers.{i}.ffn_norm.weight", (f"{_L}output.LayerNorm.weight",)),
    ("layers.{i}.ffn_norm.bias", (f"{_L}output.LayerNorm.bias",)),
)

HF_TIED: dict[str, str] = {
    "lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
    "lm_head.decoder.bias": "lm_head.bias",
}

HF_IGNORED: dict[str, str] = {
    r"roberta\.embeddings\.position_ids": "a constant arange buffer (older transformers saved it)",
    r"roberta\.embeddings\.token_type_ids": "a constant zeros buffer (older transformers saved it)",
    r"roberta\.pooler\.dense\.(weight|bias)": "the [CLS] pooler is not part of the masked-LM model",
}

CONFIG_NAMES: tuple[tuple[str, str], ...] = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"),
    ("num_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"),
    ("ffn_size", "intermediate_size"),
    ("max_positions", "max_position_embeddings"),
    ("type_vocab_size", "type_vocab_size"),
    ("pad_id", "pad_token_id"),
    ("dropout", "hidden_dropout_prob"),
    ("attention_dropout", "attention_probs_dropout_prob"),
    ("layer_norm_eps", "layer_norm_eps"),
    ("init_std", "initializer_range"),
)

HF_FIXED: dict[str, Any] = {
    "model_type": "roberta",
    "hidden_act": "gelu",
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}

_LAYER_INDEX = re.compile(r"^layers\.(\d+)\.")
_HF_LAYER_INDEX = re.compile(r"^roberta\.encoder\.layer\.(\d+)\.")


def name_table(num_layers: int) -> list[tuple[str, tuple[str, ...]]]:
    """Every (our name, HF names) row for a model with `num_layers` layers."""
    rows = list(GLOBAL_NAMES)
    for i in range(num_layers):
        rows += [(ours.format(i=i), tuple(h.format(i=i) for h in hf)) for ours, hf in LAYER_NAMES]
    return rows


def _num_layers(names: list[str], pattern: re.Pattern[str]) -> int:
    indices = [int(m.group(1)) for m in map(pattern.match, names) if m]
    return max(indices) + 1 if indices else 0


def _check_names(have: set[str], want: set[str], what: str) -> None:
    missing, unknown = sorted(want - have), sorted(have - want)
    if missing or unknown:
        def first(names: list[str], limit: int = 8) -> str:
            return f"{names[:limit]}{f' and {len(names) - limit} more' if len(names) > limit else ''}"

        raise CheckpointError(
            f"{what}: missing parameter(s) {first(missing) if missing else 'none'}; "
            f"unknown parameter(s) {first(unknown) if unknown else 'none'}"
        )


def to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> `RobertaForMaskedLM` state dict (tied names included, sharing storage).

    Wrapper prefixes are removed first; any name missing from or unknown to the table is an error.
    """
    ours = strip_wrappers(state_dict)
    table = name_table(_num_layers(list(ours), _LAYER_INDEX))
    _check_names(set(ours), {name for name, _ in table}, "our state dict -> Hugging Face")
    hf: dict[str, torch.Tensor] = {}
    for name, hf_names in table:
        tensor = ours[name]
        if len(hf_names) == 1:
            hf[hf_names[0]] = tensor
            continue
        if tensor.shape[0] % len(hf_names):
            raise CheckpointError(f"{name}: dim 0 of {tuple(tensor.shape)} does not split into {hf_names}")
        for hf_name, part in zip(hf_names, tensor.chunk(len(hf_names), dim=0)):
            hf[hf_name] = part
    for tied, source in HF_TIED.items():
        hf[tied] = hf[source]
    return hf


def ignored_hf_names(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """The names in an HF state dict that `from_hf` reads past, each with the reason."""
    out = {}
    for name in state_dict:
        for pattern, reason in HF_IGNORED.items():
            if re.fullmatch(pattern, name):
                out[name] = reason
    return out


def from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`RobertaForMaskedLM` state dict -> ours. Tied names may be present (then they must equal
    their source) or absent; `HF_IGNORED` names are dropped (see `ignored_hf_names`); anything else
    missing or unknown is an error naming it."""
    hf = {k: v for k, v in state_dict.items() if k not in ignored_hf_names(state_dict)}
    for tied, source in HF_TIED.items():
        if tied not in hf:
            continue
        if source not in hf:  # some exports keep only the decoder copy
            hf[source] = hf[tied]
        elif hf[tied].shape != hf[source].shape or not torch.equal(hf[tied], hf[source]):
            raise CheckpointError(
                f"{tied} differs from {source}: this checkpoint does not tie them, and RoBERTa's "
                "masked-LM head (ours) uses one tensor for both"
            )
        del hf[tied]
    table = name_table(_num_layers(list(hf), _HF_LAYER_INDEX))
    _check_names(set(hf), {h for _, names in table for h in names}, "Hugging Face state dict -> ours")
    out: dict[str, torch.Tensor] = {}
    for name, hf_names in table:
        parts = [hf[h] for h in hf_names]
        out[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out


def hf_config(cfg: ModelConfig, *, bos_id: int = 0, eos_id: int = 2) -> dict[str, Any]:
    """The `config.json` of a `RobertaForMaskedLM` with our model's shape (weights in fp32)."""
    out: dict[str, Any] = {"architectures": ["RobertaForMaskedLM"], **HF_FIXED}
    out.update({hf: getattr(cfg, ours) for ours, hf in CONFIG_NAMES})
    out.update({"bos_token_id": bos_id, "eos_token_id": eos_id, "dtype": "float32"})
    return out


def model_config_from_hf(config: dict[str, Any], where: str) -> ModelConfig:
    """A Hugging Face RoBERTa `config.json` (as a dict) -> ModelConfig; refuses anything our
    architecture cannot represent, naming the field. `where` names the file in errors."""
    for key, value in HF_FIXED.items():
        if key in config and config[key] != value:
            raise ConfigError(f"{where}: {key} = {config[key]!r}; only {value!r} (RoBERTa's) is supported")
    missing = [hf for _, hf in CONFIG_NAMES if hf not in config]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {missing}")
    fields = {ours: config[hf] for ours, hf in CONFIG_NAMES}
    return ModelConfig(**fields)
