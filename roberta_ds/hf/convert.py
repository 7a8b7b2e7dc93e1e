"""Lossless conversion between our checkpoints and Hugging Face `RobertaForMaskedLM` directories.

    roberta-ds export-hf --checkpoint runs/x/checkpoints --tokenizer tok/ --out hf/
    roberta-ds export-hf --checkpoint ck/ --tag step2 --model-config tiny --set vocab_size=1000 ...
    roberta-ds export-hf --state-dict w.safetensors --model-config roberta-base --tokenizer tok/ --out hf/
    roberta-ds import-hf --hf-dir /path/to/roberta-base --out init/

Export reads a DeepSpeed checkpoint of any ZeRO stage / precision (ds_checkpoint.py) or a plain
state dict, and writes `config.json`, `model.safetensors` (no pickles) and the tokenizer files into a
temporary directory (`--tokenizer`: any directory holding the tokenizer.json the model was trained
with: ours, a transformers `save_pretrained` directory, or tokenizer.json alone; hf_tokenizer.py).
Before that directory is renamed to `--out` it must pass a check: transformers loads it with no extra
arguments, the tied decoder equals the word embedding, `AutoTokenizer`
encodes like tokenizer.json, and the logits equal ours within 1e-4 (fp32) on a batch with padding
and a full-length row (hf_parity.py). On any failure nothing is left at `--out` and the exit code
is 1. The model config comes from the checkpoint's `roberta_ds.json` (whose tokenizer fingerprint
must match `--tokenizer`) or, for bare checkpoints and state dicts, from `--model-config`.

Import reads a local Hugging Face RoBERTa directory (safetensors or .bin, sharded or not; .bin
only through `torch.load(weights_only=True)`) and writes `<out>/model.safetensors` (our names) and
`<out>/model_config.json`, which `load_pretrained` returns to the trainer for `init_from`, and
`<out>/source.json` (the sha256 of the directory's tokenizer.json, if it has one: init_check.py).
Names either side that the map (hf_names.py) does not know are errors, never skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from roberta_ds.checkpoint.commit import verify_files
from roberta_ds.checkpoint.read_weights import (
    inspect_layout,
    load_weights,
    read_meta,
    resolve_tag_dir,
    strip_wrappers,
)
from roberta_ds.config import PRESETS, WEIGHT_FREE_FIELDS, ModelConfig
from roberta_ds.config_load import parse_value
from roberta_ds.data.tokenizer import TOKENIZER_FILE, TokenizerInfo, load_tokenizer_info
from roberta_ds.errors import CheckpointError, ConfigError, UserError
from roberta_ds.hf.init_check import SOURCE_FILE, source_tokenizer_sha256
from roberta_ds.hf.names import HF_TIED, from_hf, hf_config, ignored_hf_names, model_config_from_hf, to_hf
from roberta_ds.hf.parity import check_hf_dir, check_hf_tokenizer, compare_logits, probe_batch
from roberta_ds.hf.tokenizer import OPTIONAL_FILES, export_files, require_tokenizer_json
from roberta_ds.hf.weights import (
    check_out_dir,
    check_shapes,
    read_hf_weights,
    read_weights,
    save_safetensors,
    staged_dir,
)
from roberta_ds.model.model import RobertaMLM

__all__ = [
    "export_hf", "import_hf", "load_pretrained", "to_hf", "from_hf", "hf_config", "read_weights",
    "resolve_model_config", "export_main", "import_main",
]

TOKENIZER_FILES = (TOKENIZER_FILE, *OPTIONAL_FILES)
"""The tokenizer files an export carries when `--tokenizer` has them all (`roberta-ds tokenizer` writes
them all; tokenizer.json alone is enough: hf_tokenizer.export_files)."""
WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
DEFAULT_ATOL = 1e-4

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------
# Model config


def _fields_to_config(fields: Any, where: str) -> ModelConfig:
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: expected an object of ModelConfig fields")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown ModelConfig field(s) {unknown}; known: {sorted(known)}")
    try:
        return ModelConfig(**fields)  # every field type-checked from its annotation (config_types.py)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def resolve_model_config(spec: str | ModelConfig | None,
                         overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    """`--model-config` (a preset name, a JSON file of ModelConfig fields or of {"model": {...}}, or a
    ModelConfig) with `--set field=value` overrides applied."""
    if spec is None:
        raise ConfigError("--model-config: required (a preset name or a JSON file of ModelConfig fields)")
    if isinstance(spec, ModelConfig):
        cfg = spec
    elif spec in PRESETS:
        cfg = PRESETS[spec]
    elif Path(spec).is_file():
        try:
            raw = json.loads(Path(spec).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model-config {spec}: not JSON ({e})") from None
        fields = raw.get("model", raw) if isinstance(raw, dict) else raw
        cfg = _fields_to_config(fields, f"--model-config {spec}")
    else:
        raise ConfigError(f"--model-config {spec!r}: neither a preset {sorted(PRESETS)} nor a JSON file")
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected field=value, e.g. --set vocab_size=32000")
        changes[key.removeprefix("model.")] = parse_value(value)
    return _fields_to_config({**dataclasses.asdict(cfg), **changes}, "--set")


def _config_for_checkpoint(tag_dir: Path, meta: dict[str, Any] | None, spec: str | ModelConfig | None,
                           overrides: list[str]) -> ModelConfig:
    meta_path = tag_dir / "roberta_ds.json"
    if meta is None:
        if spec is None:
            raise ConfigError(
                f"{tag_dir}: no {meta_path.name} (a bare DeepSpeed checkpoint), so the model shape is "
                "unknown: pass --model-config (a preset or a JSON file) and any --set field=value"
            )
        return resolve_model_config(spec, overrides)
    cfg = _fields_to_config(meta["model"], str(meta_path))
    if spec is not None:
        given = resolve_model_config(spec, ())
        differ = [f.name for f in dataclasses.fields(ModelConfig)
                  if f.name not in WEIGHT_FREE_FIELDS and getattr(given, f.name) != getattr(cfg, f.name)]
        if differ:
            raise ConfigError(
                f"--model-config {spec}: differs from the checkpoint's own config ({meta_path}) in {differ}; "
                "drop --model-config (the checkpoint's is used)"
            )
    return resolve_model_config(cfg, overrides)


def _build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> RobertaMLM:
    """RobertaMLM(cfg) holding `weights` in fp32 (built on meta: no init work, no second copy)."""
    with torch.device("meta"):
        model = RobertaMLM(cfg)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Export


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    model: ModelConfig
    source: str
    max_abs_diff: float
    """Max abs logit difference, ours vs the exported model loaded by transformers."""


def _check_tokenizer_fits(tok: TokenizerInfo, cfg: ModelConfig, tok_dir: Path) -> None:
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"--tokenizer {tok_dir}: {tok.vocab_size} ids but model.vocab_size is "
                          f"{cfg.vocab_size}; this is not the tokenizer the model was trained with")
    if tok.special_ids["pad"] != cfg.pad_id:
        raise ConfigError(f"--tokenizer {tok_dir}: <pad> is id {tok.special_ids['pad']} "
                          f"but model.pad_id is {cfg.pad_id}")


def _from_checkpoint(checkpoint: str | os.PathLike, tag: str | None, spec: str | ModelConfig | None,
                     overrides: list[str], tok: TokenizerInfo, tok_dir: Path, log: Log
                     ) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    tag_dir = resolve_tag_dir(checkpoint, tag)
    meta = read_meta(tag_dir)
    cfg = _config_for_checkpoint(tag_dir, meta, spec, overrides)
    _check_tokenizer_fits(tok, cfg, tok_dir)
    if meta is not None and not meta.get("tokenizer_sha256"):
        log(f"note: {tag_dir / 'roberta_ds.json'} records no tokenizer_sha256; cannot check --tokenizer")
    elif meta is not None and meta["tokenizer_sha256"] != tok.sha256:
        raise CheckpointError(
            f"--tokenizer {tok_dir}: tokenizer.json sha256 {tok.sha256[:16]}... is not the tokenizer this "
            f"checkpoint was trained with ({meta['tokenizer_sha256'][:16]}..., {tag_dir / 'roberta_ds.json'})"
        )
    if meta is not None and "files" in meta:  # our trainer's manifest: sizes and sha256 of every file
        verify_files(tag_dir, meta, lambda i: True)
        log(f"verified {len(meta['files'])} checkpoint files against {tag_dir / 'roberta_ds.json'} (sha256)")
    layout = inspect_layout(tag_dir)
    source = f"{tag_dir} (ZeRO stage {layout.zero_stage}, {layout.precision}, {layout.world_size} rank(s))"
    if layout.optimizer == "none" and layout.precision != "fp32":
        log(f"note: stage-0 {layout.precision} checkpoint: exporting the {layout.precision} module weights "
            "(DeepSpeed stores no named fp32 copy without ZeRO)")
    return cfg, load_weights(tag_dir, layout), source


def _from_state_dict(state_dict: str | os.PathLike | dict[str, torch.Tensor], spec: str | ModelConfig | None,
                     overrides: list[str]) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    if isinstance(state_dict, dict):
        weights, source = dict(state_dict), "state dict"
    else:
        weights, source = read_weights(state_dict), str(state_dict)
        sidecar = Path(state_dict).parent / MODEL_CONFIG_FILE  # written by import-hf
        if spec is None and sidecar.is_file():
            spec = str(sidecar)
    return resolve_model_config(spec, overrides), strip_wrappers(weights), source


def export_hf(
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    tag: str | None = None,
    state_dict: str | os.PathLike | dict[str, torch.Tensor] | None = None,
    model_cfg: str | ModelConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    atol: float = DEFAULT_ATOL,
    log: Log = print,
) -> ExportResult:
    """Write a checked Hugging Face `RobertaForMaskedLM` directory from a DeepSpeed checkpoint
    (`checkpoint` + optional `tag`) or a state dict (file or dict; `model_cfg` then required, or a
    `model_config.json` beside the file). Raises UserError, leaving nothing at `out_dir`, on any problem."""
    out, tok_dir = Path(out_dir), Path(tokenizer_dir)
    if (checkpoint is None) == (state_dict is None):
        raise UserError("give exactly one of --checkpoint and --state-dict")
    if tag is not None and checkpoint is None:
        raise UserError("--tag only applies to --checkpoint")
    check_out_dir(out)
    tok = load_tokenizer_info(require_tokenizer_json(tok_dir))
    tok_files = export_files(tok_dir, tok.special_ids)
    if checkpoint is not None:
        cfg, weights, source = _from_checkpoint(checkpoint, tag, model_cfg, list(overrides), tok, tok_dir,
                                                log)
    else:
        cfg, weights, source = _from_state_dict(state_dict, model_cfg, list(overrides))
        _check_tokenizer_fits(tok, cfg, tok_dir)
    check_shapes(weights, cfg, source)
    model = _build_model(cfg, weights)

    bos, eos = tok.special_ids["bos"], tok.special_ids["eos"]
    with staged_dir(out) as tmp:
        config = hf_config(cfg, bos_id=bos, eos_id=eos)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        hf = {k: v for k, v in to_hf(model.state_dict()).items() if k not in HF_TIED}  # as save_pretrained
        save_safetensors(hf, tmp / WEIGHTS_FILE)
        for name, data in tok_files.items():
            (tmp / name).write_bytes(data)
        diff = check_hf_dir(tmp, model, tok.vocab_size, bos, eos, atol)
        check_hf_tokenizer(tmp, tok.path, cfg.pad_id)
    log(f"exported {source} -> {out}: max abs logit diff vs ours {diff:.2e} (<= {atol:g}), "
        "tied decoder ok, tokenizer ok")
    return ExportResult(out, cfg, source, diff)


# ----------------------------------------------------------------------------------------------
# Import


def read_hf_dir(hf_dir: str | os.PathLike, log: Log = print) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, our state dict) of a local Hugging Face RoBERTa directory; names and shapes checked."""
    d = Path(hf_dir)
    config_path = d / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"--hf-dir {d}: no config.json; pass a Hugging Face model directory")
    cfg = model_config_from_hf(json.loads(config_path.read_text()), str(config_path))
    hf = read_hf_weights(d)
    for name, reason in ignored_hf_names(hf).items():
        log(f"note: not imported: {name} ({reason})")
    weights = from_hf(hf)
    check_shapes(weights, cfg, f"--hf-dir {d}")
    return cfg, weights


def _verify_import(hf_dir: Path, cfg: ModelConfig, weights: dict[str, torch.Tensor], log: Log) -> None:
    try:
        import transformers
    except ImportError:
        log("note: transformers is not installed; skipping the logits check against Hugging Face")
        return
    hf_model = transformers.RobertaForMaskedLM.from_pretrained(str(hf_dir))
    diff = compare_logits(_build_model(cfg, weights), hf_model, probe_batch(cfg, cfg.vocab_size))
    if not diff <= DEFAULT_ATOL:
        raise CheckpointError(f"--hf-dir {hf_dir}: our logits differ from Hugging Face's by {diff:.3g}")
    log(f"checked: max abs logit diff vs Hugging Face {diff:.2e}")


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, verify: bool = True,
              log: Log = print) -> ModelConfig:
    """Convert a Hugging Face RoBERTa directory into `<out>/model.safetensors` + `model_config.json`.
    With `verify` (and transformers installed) our logits must first equal HF's within 1e-4."""
    out = Path(out_dir)
    check_out_dir(out)
    cfg, weights = read_hf_dir(hf_dir, log)
    if verify:
        _verify_import(Path(hf_dir), cfg, weights, log)
    with staged_dir(out) as tmp:
        save_safetensors(weights, tmp / WEIGHTS_FILE)
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        # init_from compares the run's tokenizer with this one (init_check.py)
        source = {"hf_dir": str(hf_dir), "tokenizer_sha256": source_tokenizer_sha256(hf_dir)}
        (tmp / SOURCE_FILE).write_text(json.dumps(source) + "\n")
    log(f"imported {hf_dir} -> {out} ({cfg.num_layers} layers x {cfg.hidden_size}, vocab {cfg.vocab_size})")
    return cfg


def load_pretrained(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, state dict in our names) for `init_from`: a directory written by `import-hf`
    (model_config.json + model.safetensors), or a Hugging Face RoBERTa directory converted on the fly."""
    d = Path(path)
    if (d / MODEL_CONFIG_FILE).is_file():
        cfg = _fields_to_config(json.loads((d / MODEL_CONFIG_FILE).read_text()), str(d / MODEL_CONFIG_FILE))
        weights = read_weights(d / WEIGHTS_FILE)
        check_shapes(weights, cfg, str(d / WEIGHTS_FILE))
        return cfg, weights
    if (d / "config.json").is_file():
        return read_hf_dir(d, log=lambda msg: print(msg, file=sys.stderr))
    raise CheckpointError(
        f"{d}: neither {MODEL_CONFIG_FILE} (from `roberta-ds import-hf`) nor a Hugging Face config.json"
    )


# ----------------------------------------------------------------------------------------------
# CLI


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="roberta-ds export-hf", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory (with `latest`) or a tag directory")
    src.add_argument("--state-dict", help="a .safetensors or weights-only .pt state dict in our names")
    p.add_argument("--tag", help="checkpoint tag (default: the one in `latest`)")
    p.add_argument("--model-config", help="preset name or JSON file; required without roberta_ds.json")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="ModelConfig override")
    p.add_argument("--tokenizer", required=True, help="the tokenizer directory the model was trained with")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="max abs logit difference allowed")
    a = p.parse_args(argv)
    export_hf(a.out, a.tokenizer, checkpoint=a.checkpoint, tag=a.tag, state_dict=a.state_dict,
              model_cfg=a.model_config, overrides=a.set, atol=a.atol)
    return 0


def import_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="roberta-ds import-hf", description="Hugging Face RoBERTa -> ours")
    p.add_argument("--hf-dir", required=True, help="local Hugging Face RoBERTa directory")
    p.add_argument("--out", required=True, help="output directory: model.safetensors + model_config.json")
    p.add_argument("--no-verify", action="store_true", help="skip the logits check against transformers")
    a = p.parse_args(argv)
    import_hf(a.hf_dir, a.out, verify=not a.no_verify)
    return 0
