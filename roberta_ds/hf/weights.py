"""Weight files: read without running code, write safetensors, check names/shapes, publish atomically.

- `read_weights`: `.safetensors`, or `.pt`/`.bin` through `torch.load(weights_only=True)` only, so
  a pickle that would run code on load is refused (never executed).
- `check_shapes`: a state dict must hold exactly the parameters of `RobertaMLM(cfg)`; the error
  lists missing / unknown / mis-shaped names and guesses the shape the weights do have.
- `staged_dir`: build an output directory under a temporary name beside it and rename it into
  place only when the block succeeds, so a failed or interrupted conversion leaves nothing that
  looks valid.

    with staged_dir(Path("out")) as tmp:
        save_safetensors(weights, tmp / "model.safetensors")
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Iterator

import torch

from roberta_ds.config import ModelConfig
from roberta_ds.durable import fsync_dir, fsync_tree, only_allowed_globals
from roberta_ds.errors import CheckpointError, UserError
from roberta_ds.model.model import RobertaMLM


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from `.safetensors`, or from `.pt`/`.pth`/`.bin` through
    `torch.load(weights_only=True)`: a pickle that would run code is refused, never executed."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None
    try:
        with only_allowed_globals():
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{p}: refused: it pickles objects other than tensors, and unpickling them could run code. "
            f"Save a plain state dict or a .safetensors file. ({str(e).splitlines()[0]})"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a truncated/corrupt file
        raise CheckpointError(f"{p}: cannot read it ({type(e).__name__}: {e})") from None
    flat = isinstance(obj, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
    if not flat:
        raise CheckpointError(f"{p}: expected a flat dict of name -> tensor (a state dict), got {type(obj)}")
    return obj


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory: sharded (index.json) or single file,
    safetensors preferred over `pytorch_model.bin`."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = hf_dir / index_name
        if index.is_file():
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                out.update(read_weights(hf_dir / shard))
            return out
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / name).is_file():
            return read_weights(hf_dir / name)
    raise CheckpointError(f"{hf_dir}: no model.safetensors, pytorch_model.bin or sharded index in it")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` as safetensors (metadata format=pt, as transformers writes)."""
    from safetensors.torch import save_file

    def owned(t: torch.Tensor) -> torch.Tensor:
        # safetensors refuses tensors that share storage (the QKV split, ZeRO-2's flat buffer): copy
        # those, and only those, so the peak stays near one extra copy of the model.
        t = t.detach().contiguous()
        return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()

    save_file({k: owned(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of RobertaMLM(cfg), built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = RobertaMLM(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _shape_hint(weights: dict[str, torch.Tensor]) -> str:
    probes = (
        ("vocab_size", "embeddings.word.weight", 0),
        ("hidden_size", "embeddings.word.weight", 1),
        ("max_positions", "embeddings.position.weight", 0),
        ("ffn_size", "layers.0.ffn.fc.weight", 0),
    )
    guess = {field: weights[name].shape[dim] for field, name, dim in probes
             if name in weights and weights[name].dim() > dim}
    guess["num_layers"] = len({n.split(".")[1] for n in weights if n.startswith("layers.")})
    return ", ".join(f"{k}={v}" for k, v in guess.items())


def _first(names: list[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def check_shapes(weights: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> None:
    """Every parameter of RobertaMLM(cfg) present with its shape and nothing else; errors list them."""
    want = expected_shapes(cfg)
    missing, unknown = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
    wrong = [f"{n}: {tuple(weights[n].shape)} vs {want[n]}"
             for n in want if n in weights and tuple(weights[n].shape) != want[n]]
    if not (missing or unknown or wrong):
        return
    parts = [f"missing {_first(missing)}" if missing else "", f"unknown {_first(unknown)}" if unknown else "",
             f"shape (weights vs config) {_first(wrong)}" if wrong else ""]
    raise CheckpointError(
        f"{where}: does not fit the model config ({'; '.join(p for p in parts if p)}). It belongs to "
        f"another model shape; the weights look like {_shape_hint(weights)}: pass the --model-config "
        "it was trained with"
    )


def check_out_dir(out: Path) -> None:
    """`out` must not exist, or be an empty directory: a conversion never overwrites anything."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not empty; remove it or choose another directory")


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh `.<name>.tmp-<pid>` directory beside `out`. When the block succeeds its files
    are fsynced and it is renamed to `out`; when the block raises it is deleted."""
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if out.is_dir():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
