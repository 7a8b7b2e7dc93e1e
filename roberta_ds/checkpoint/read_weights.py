"""Read the model weights, in fp32, out of a DeepSpeed checkpoint of any ZeRO stage and precision.

Layout (DeepSpeed's, with our trainer's additions):

    <ckpt>/latest                    the tag of the newest committed checkpoint, e.g. "step1000"
    <ckpt>/<tag>/roberta_ds.json     ours: {"model": {ModelConfig fields}, "tokenizer_sha256": ...}
    <ckpt>/<tag>/mp_rank_00_model_states.pt                      stage 0-2: the module, param shapes
    <ckpt>/<tag>/zero_pp_rank_<r>_mp_rank_00_model_states.pt     stage 3: one per data-parallel rank
    <ckpt>/<tag>/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt   stage >= 1: one per rank

Consolidation is DeepSpeed's own code (`deepspeed.utils.zero_to_fp32`), in its lazy mode: each
rank's optimizer file is memory-mapped and its Adam moments are dropped unread, so only the fp32
master weights are ever paged in, one tensor at a time for ZeRO-3. Two layouts that function does
not take are handled here with DeepSpeed's own pieces:
- stage 0 (no ZeRO): the weights are the `module` of the model-states file (in the training
  precision: with bf16/fp16 and no ZeRO, DeepSpeed keeps its fp32 master copy flat and unnamed);
- ZeRO-1 with bf16 and fp32 gradient accumulation (DeepSpeed's `BF16_Optimizer`): its partitions
  have the ZeRO-1/2 layout, so DeepSpeed's ZeRO-2 merge rebuilds them.

    from roberta_ds.checkpoint.read_weights import resolve_tag_dir, load_weights, read_meta
    tag_dir = resolve_tag_dir("runs/x/checkpoints")          # follows `latest`
    weights = load_weights(tag_dir)                           # {our name: fp32 tensor}
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from roberta_ds.durable import check_pickle_safe
from roberta_ds.errors import CheckpointError

META_FILE = "roberta_ds.json"
LATEST_FILE = "latest"
_MODEL_STATES = "*_model_states.pt"
_OPTIM_STATES = "*_optim_states.pt"
_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_")

# prefixes wrappers put on our parameter names: torch.compile `_orig_mod.`, DDP/DeepSpeed `module.`
WRAPPER_PREFIXES: tuple[str, ...] = ("_orig_mod.", "module.")


def strip_wrappers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `WRAPPER_PREFIXES` (in any nesting, e.g. `module._orig_mod.`) from every key."""
    out = {}
    for name, tensor in state_dict.items():
        bare = name
        while bare.startswith(WRAPPER_PREFIXES):
            bare = bare.split(".", 1)[1]
        if bare in out:
            raise CheckpointError(f"parameter {bare!r} appears twice (as {name!r} and another wrapped name)")
        out[bare] = tensor
    return out


@dataclass(frozen=True)
class Layout:
    """What a tag directory holds."""

    tag_dir: Path
    zero_stage: int
    world_size: int
    """Data-parallel ranks that wrote the checkpoint."""
    optimizer: str
    """"zero" (DeepSpeed ZeRO 1-3), "bf16" (BF16_Optimizer) or "none" (stage 0)."""
    precision: str
    """"bf16", "fp16" or "fp32", from the saved DeepSpeed config."""


def _tags_in(ckpt_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in ckpt_dir.glob(f"*/{_MODEL_STATES}"))


def _is_tag_dir(path: Path) -> bool:
    return any(path.glob(_MODEL_STATES))


def resolve_tag_dir(path: str | Path, tag: str | None = None) -> Path:
    """The tag directory for `path` (a checkpoint directory or a tag directory itself) and `tag`
    (default: the one `latest` names). Errors name what is missing and what was found instead."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"--checkpoint {root}: no such directory")
    if not any(root.iterdir()):
        raise CheckpointError(f"--checkpoint {root}: the directory is empty; it holds no checkpoint")
    if tag is None and _is_tag_dir(root):
        return root
    found = _tags_in(root) or "none"
    if tag is None:
        latest = root / LATEST_FILE
        if not latest.is_file():
            raise CheckpointError(
                f"--checkpoint {root}: no `{LATEST_FILE}` file naming the checkpoint to use; pass --tag "
                f"(tags found: {found})"
            )
        tag = latest.read_text().strip()
        if not tag:
            raise CheckpointError(f"{latest}: the file is empty; pass --tag (tags found: {found})")
        source = f"{latest} names tag {tag!r}"
    else:
        source = f"--tag {tag!r}"
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{source}, but {tag_dir} does not exist (tags found: {found})")
    if not _is_tag_dir(tag_dir):
        raise CheckpointError(
            f"{tag_dir}: no DeepSpeed model-states file ({_MODEL_STATES}); the checkpoint is incomplete "
            "(an interrupted save?) or is not a DeepSpeed checkpoint"
        )
    return tag_dir


def read_meta(tag_dir: Path) -> dict[str, Any] | None:
    """Our trainer's `roberta_ds.json` of a tag directory, or None for a bare DeepSpeed checkpoint."""
    path = tag_dir / META_FILE
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path}: expected an object with a `model` object of ModelConfig fields")
    return meta


def _load_deepspeed_file(path: Path) -> dict[str, Any]:
    """The ONE place of ours that unpickles with `weights_only=False` (DeepSpeed's `zero_to_fp32`,
    which we call, does the same internally).

    DeepSpeed's files pickle its own classes (e.g. `ZeroStageEnum`), which plain `weights_only=True`
    refuses. Unpickling can run code, so `inspect_layout` first passes every `.pt` file of the tag
    directory through `checkpoint.check_pickle_safe` (the weights-only unpickler plus an allowlist
    of DeepSpeed's state classes) and refuses anything else. mmap=True pages tensors in only when read.
    """
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a truncated/corrupt file
        raise CheckpointError(f"{path}: cannot read this DeepSpeed file ({type(e).__name__}: {e})") from None


def _rank_files(tag_dir: Path, pattern: str) -> dict[int, Path]:
    out: dict[int, Path] = {}
    for p in sorted(tag_dir.glob(pattern)):
        m = _RANK.search(p.name)
        if m is None:
            continue
        if int(m.group(2)) != 0:
            raise CheckpointError(f"{p}: model-parallel rank {int(m.group(2))}; only mp_rank 00 (no tensor "
                                  "parallelism) is supported")
        out[int(m.group(1))] = p
    return out


def _check_ranks(tag_dir: Path, found: dict[int, Path], world_size: int, what: str) -> None:
    missing = [r for r in range(world_size) if r not in found]
    extra = sorted(r for r in found if r >= world_size)
    if missing:
        raise CheckpointError(
            f"{tag_dir}: missing {what} file(s) for data-parallel rank(s) {missing} of {world_size} "
            f"(expected e.g. zero_pp_rank_{missing[0]}_mp_rank_00_{what}.pt); the save did not complete on "
            "every rank, or files were removed"
        )
    if extra:
        raise CheckpointError(
            f"{tag_dir}: {what} files for rank(s) {extra} but the checkpoint says {world_size} rank(s) "
            "wrote it; stale files from another run are mixed in"
        )


def _precision(ds_config: Any) -> str:
    cfg = ds_config if isinstance(ds_config, dict) else {}
    for key, name in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16")):
        if isinstance(cfg.get(key), dict) and cfg[key].get("enabled"):
            return name
    return "fp32"


def inspect_layout(tag_dir: Path) -> Layout:
    """Stage, world size, optimizer kind and precision of a tag directory; checks every rank's
    files are present and every pickle is free of code (before anything unpickles them)."""
    for path in sorted(tag_dir.glob("*.pt")):
        if not zipfile.is_zipfile(path):  # torch.save's format is a zip archive
            raise CheckpointError(f"{path}: cannot read it: not a torch checkpoint (truncated or corrupt)")
        check_pickle_safe(path)
    model_files = _rank_files(tag_dir, _MODEL_STATES)
    single = tag_dir / "mp_rank_00_model_states.pt"
    head = model_files.get(0, single)
    if not head.is_file():
        raise CheckpointError(
            f"{tag_dir}: neither mp_rank_00_model_states.pt nor zero_pp_rank_0_mp_rank_00_model_states.pt; "
            "the rank-0 model-states file is missing"
        )
    states = _load_deepspeed_file(head)
    world_size = int(states.get("dp_world_size", 1))
    precision = _precision(states.get("ds_config"))
    if model_files:  # ZeRO-3 writes one model-states file per rank
        _check_ranks(tag_dir, model_files, world_size, "model_states")
    optim_files = _rank_files(tag_dir, _OPTIM_STATES)
    if not optim_files:
        if model_files:
            raise CheckpointError(f"{tag_dir}: ZeRO-3 model states but no *_optim_states.pt files (missing)")
        if states.get("param_shapes"):  # ZeRO saved the weights into optimizer files we do not have
            raise CheckpointError(f"{tag_dir}: a ZeRO checkpoint without *_optim_states.pt files (missing)")
        return Layout(tag_dir, 0, world_size, "none", precision)
    _check_ranks(tag_dir, optim_files, world_size, "optim_states")
    optim = _load_deepspeed_file(optim_files[0]).get("optimizer_state_dict", {})
    if "zero_stage" in optim:
        return Layout(tag_dir, int(optim["zero_stage"]), world_size, "zero", precision)
    if "single_partition_of_fp32_groups" in optim:
        return Layout(tag_dir, 1, world_size, "bf16", precision)
    raise CheckpointError(f"{optim_files[0]}: not an optimizer-states layout this DeepSpeed version knows")


def _materialize(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    # Lazy ZeRO-3 entries gather their slices on .contiguous(); the clone detaches each tensor from
    # the large flat buffers (and from the mmap), one at a time.
    return {name: t.contiguous().float().clone() for name, t in state.items()}


def _zero_weights(layout: Layout) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = get_fp32_state_dict_from_zero_checkpoint(
        str(layout.tag_dir.parent), tag=layout.tag_dir.name, lazy_mode=True
    )
    return _materialize(lazy)


def _bf16_optimizer_weights(layout: Layout) -> dict[str, torch.Tensor]:
    from deepspeed.utils import zero_to_fp32 as z

    model_states = z.parse_model_states([str(layout.tag_dir / "mp_rank_00_model_states.pt")])
    groups = []
    for rank, path in sorted(_rank_files(layout.tag_dir, _OPTIM_STATES).items()):
        optim = _load_deepspeed_file(path)["optimizer_state_dict"]
        optim.pop("base_optimizer_state", None)  # the Adam moments: never read (mmap)
        groups.append(optim["single_partition_of_fp32_groups"])
    merged = z._get_fp32_state_dict_from_zero2_checkpoint(layout.world_size, groups, model_states, False)
    return _materialize(merged)


def _stage0_weights(layout: Layout) -> dict[str, torch.Tensor]:
    module = _load_deepspeed_file(layout.tag_dir / "mp_rank_00_model_states.pt")["module"]
    return _materialize(module)


def load_weights(tag_dir: Path, layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """{our parameter name: fp32 tensor} of a tag directory (wrapper prefixes removed). `layout`,
    when given, must come from `inspect_layout(tag_dir)` (which also vets the pickles)."""
    layout = layout or inspect_layout(tag_dir)
    readers = {"zero": _zero_weights, "bf16": _bf16_optimizer_weights, "none": _stage0_weights}
    reader = readers[layout.optimizer]
    # DeepSpeed reports progress with print(): keep stdout for our own report.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            weights = reader(layout)
        except CheckpointError:
            raise
        except (ValueError, KeyError, RuntimeError, FileNotFoundError) as e:
            raise CheckpointError(
                f"{tag_dir}: DeepSpeed could not consolidate it ({type(e).__name__}: {e})"
            ) from None
    return strip_wrappers(weights)
