"""Each rank's RNG states (torch CPU and CUDA, numpy, Python) as JSON, saved beside a checkpoint as
`rng_rank<NNNNN>.json`: nothing of ours unpickles, and a resumed run continues every stream exactly."""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch CPU + CUDA, numpy, python) as a JSON-able dict."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch_cpu": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), *[float(x) if isinstance(x, float) else int(x) for x in np_state[2:]]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["torch_cuda"]])


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.json"
