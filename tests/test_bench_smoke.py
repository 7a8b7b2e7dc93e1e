"""bench/train_throughput.py keeps working on CPU: tiny cases through the real trainer, HF baseline,
the ratio table printed last, and the bf16-vs-fp32 loss parity on the same batches.

Timings are not asserted (a shared CPU); correctness is: the table, the ratios computed from the
rows, the parity check (and that it can fail), no recompiles, sane phase shares.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from roberta_ds.quickstart.pipeline import launcher_env

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import cases
import parity
import table
import train_throughput as tt

TABLE_HEADER = "== roberta-ds training throughput"


def run_bench(
    tmp_path: Path, *args: str, timeout: float = 150
) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "rows.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "train_throughput.py"),
        "--smoke",
        "--work",
        str(tmp_path / "w"),
        "--json",
        str(out),
        *args,
    ]
    proc = subprocess.run(
        cmd, env=launcher_env(), capture_output=True, text=True, timeout=timeout, cwd=str(REPO), check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def table_lines(stdout: str) -> list[str]:
    """The table block: everything after the header, which must come once, after every progress line."""
    assert stdout.count(TABLE_HEADER) == 1, stdout
    tail = stdout.split(TABLE_HEADER, 1)[1]
    assert "[bench]" not in tail, "progress lines after the table: it must be printed last"
    return tail.splitlines()


def row_line(lines: list[str], case: str) -> list[str]:
    hits = [ln.split() for ln in lines if ln.startswith(case + " ")]
    assert hits, f"no table row for {case}:\n" + "\n".join(lines)
    return hits[0]


def test_smoke_run_table_ratios_and_parity(tmp_path: Path) -> None:
    cases = ["base512_m64", "hf_base512_m64", "large512_m32_ckpt", "base512_m128_z1_unpad", "parity",
             "parity_z1_unpad"]
    prof = tmp_path / "prof"
    proc, rows = run_bench(tmp_path, "--in-process", "--profile", str(prof), "--cases", *cases)
    by = {r["case"]: r for r in rows}
    # One profile per model size: the first `ours` case of base and of large, not the second base case.
    assert sorted(p.name for p in prof.iterdir()) == [
        "profile_base512_m64.txt",
        "profile_large512_m32_ckpt.txt",
    ]
    assert "Self CPU" in (prof / "profile_large512_m32_ckpt.txt").read_text()
    assert [r["case"] for r in rows] == cases and all(r["status"] == "ok" for r in rows), rows
    lines = table_lines(proc.stdout)

    for name in ("base512_m64", "large512_m32_ckpt", "base512_m128_z1_unpad"):
        r = by[name]
        assert r["impl"] == "ours" and r["tokens_per_s"] > 0 and r["samples_per_s"] > 0
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 2 * math.log(2048)
        assert r["recompiles"] == 0
        assert 0.5 < r["fill"] <= 1.0
        assert 0.0 <= r["data_share"] <= r["outside_fb_share"] < 1.0
        assert r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"]
    assert by["large512_m32_ckpt"]["model"] == "tiny,L4,ckpt"
    assert by["base512_m128_z1_unpad"]["model"] == "tiny,varlen,unpad"
    # A ZeRO-1 case runs the shipped zero1_bf16.json: hooked, fused fp32 gradient accumulation.
    z1 = by["base512_m128_z1_unpad"]
    assert z1["zero"] == 1 and z1["grad_accum"] == "fp32 accumulation 1 kernel(s)/tensor (fused, hooks)"
    assert by["base512_m64"]["grad_accum"] is None  # ZeRO-2: DeepSpeed's own optimizer, untouched
    assert "ZeRO-1 fp32 accumulation 1 kernel(s)/tensor" in proc.stdout

    # The ratio printed is ours / HF+DeepSpeed on the same model, seq and micro batch.
    ours, hf = by["base512_m64"], by["hf_base512_m64"]
    assert (ours["model"], ours["seq"], ours["micro"]) == (hf["model"], hf["seq"], hf["micro"])
    assert f"{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x" in row_line(lines, "base512_m64")
    assert (
        hf["impl"] == "hf_ds"
        and hf["zero"] == 2
        and hf["precision"] == "ds-bf16"
        and math.isfinite(hf["loss"])
    )
    assert "n/a (CPU)" in " ".join(row_line(lines, "base512_m64"))

    # bf16 DeepSpeed path vs eager fp32 on the same batches: close, and the check can bite (the
    # loss moved by more than the tolerance, the updates point the same way).
    p = by["parity"]
    assert p["ok"], p
    assert len(p["ours_losses"]) == len(p["ref_losses"]) == 6
    assert p["max_rel_gap"] <= p["rtol"] == parity.PARITY_RTOL
    assert p["loss_drop"] / p["ref_losses"][0] > 2 * p["rtol"]
    assert p["update_cosine"] >= parity.PARITY_MIN_COSINE
    assert any(ln.startswith("parity ") and " OK: " in ln for ln in lines)
    # The fastest setting (varlen, padding-free layers, ZeRO-1) against the plain eager fp32 model.
    u = by["parity_z1_unpad"]
    assert u["ok"] and u["zero"] == 1 and u["max_rel_gap"] <= parity.PARITY_RTOL, u
    assert u["update_cosine"] >= parity.PARITY_MIN_COSINE and u["ours_losses"] != p["ours_losses"]


def test_smoke_case_in_child_process(tmp_path: Path) -> None:
    """The GPU run's mode: each case in its own process, its row handed back as JSON."""
    proc, rows = run_bench(tmp_path, "--cases", "base512_m32", "base512_m128_z1_hash")
    assert rows[0]["status"] == "ok" and rows[0]["impl"] == "ours" and rows[0]["tokens_per_s"] > 0
    assert (tmp_path / "w" / "logs" / "base512_m32.log").is_file()
    row_line(table_lines(proc.stdout), "base512_m32")
    assert rows[1]["status"] == "ok" and rows[1]["model"].endswith("drop-hash")


def test_model_check_smoke(tmp_path: Path) -> None:
    """bench/model_check.py on CPU: kernels read from the profiler, head parity passes, HF timed."""
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "model_check.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["head"]["ok"] and res["head"]["rel_gaps"]["fp32 masked vs fp32 full"] < 1e-5
    # On CPU the varlen kernel's segments run through SDPA with a block mask: the same numbers exactly.
    assert res["varlen"]["ok"] and res["varlen"]["rel_gap"] == 0.0 and res["varlen"]["grad_cosine"] > 0.9999
    assert "padded batch, varlen" in res["kernels"]
    assert all(ops and ops != ["none seen"] for ops in res["kernels"].values())
    names = [r["variant"] for r in res["timing"]]
    assert names[-1].startswith("HF") and all(r["ms"] > 0 for r in res["timing"])
    assert res["timing"][-1]["speedup_vs_hf"] == 1.0
    last = proc.stdout.rstrip().splitlines()
    assert last[-2].lstrip().startswith("HF RobertaForMaskedLM") and last[-1].endswith("PASS")


def test_compare_losses_tolerance() -> None:
    ref = [7.0, 6.5, 6.0]
    assert parity.compare_losses([7.01, 6.49, 6.02], ref)["losses_ok"]
    assert not parity.compare_losses([7.0, 6.5, 6.5], ref)["losses_ok"]  # an update lost: 8% off
    assert not parity.compare_losses([7.0, math.nan, 6.0], ref)["losses_ok"]
    with pytest.raises(ValueError):
        parity.compare_losses([1.0], ref)


def test_update_cosine() -> None:
    import torch

    init = {"w": torch.zeros(4), "b": torch.ones(2)}
    ref = {"w": torch.tensor([1.0, 2.0, 0.0, 0.0]), "b": torch.tensor([1.0, 1.5])}
    same = {"w": torch.tensor([1.01, 1.99, 0.0, 0.0]), "b": torch.tensor([1.0, 1.49])}
    other = {"w": torch.tensor([0.0, 0.0, 1.0, -2.0]), "b": torch.tensor([1.0, 1.0])}
    assert parity.update_cosine(init, same, ref) > 0.999
    assert abs(parity.update_cosine(init, other, ref)) < 1e-9


def _row(
    case: str, impl: str, tps: float, micro: int = 64, model: str = "base", goal: float | None = None
) -> dict:
    return {
        "case": case,
        "impl": impl,
        "model": model,
        "seq": 512,
        "micro": micro,
        "accum": 8,
        "status": "ok",
        "tokens_per_s": tps,
        "samples_per_s": tps / 512,
        "goal": goal,
        "recompiles": 0,
    }


def test_format_table_ratios_goals_and_failures() -> None:
    rows = [
        _row("ours64", "ours", 600e3, goal=600e3),
        _row("ours128", "ours", 500e3, micro=128, goal=600e3),
        _row("hf64", "hf_ds", 200e3),
        _row("hf32", "hf_ds", 150e3, micro=32),
        _row("hfc", "hf_compiled", 250e3),
        _row("large", "ours", 100e3, model="large", goal=220e3),
        {"case": "gone", "status": "timeout", "error": "rc timeout"},
    ]
    lines = table.format_table(rows, gpu=True).splitlines()
    get = {ln.split()[0]: ln for ln in lines if ln and not ln.startswith(("-", "case"))}
    assert (
        "3.00x" in get["ours64"] and "2.40x" in get["ours64"] and "PASS" in get["ours64"]
    )  # vs 200K, vs best 250K
    assert "miss" in get["ours128"] and "2.00x" in get["ours128"]  # no HF at micro 128: only vs best
    assert "1.25x" in get["hfc"]  # compiled HF vs HF+DeepSpeed at the same micro
    assert "-" in get["large"].split()[-4:-2] and "miss" in get["large"]  # no HF row for large: no ratio
    assert get["gone"].split()[1].startswith("TIMEOUT")
    assert "n/a (CPU)" in table.format_table(rows, gpu=False)


def test_budget_spent_skips_without_starting(tmp_path: Path) -> None:
    opts = argparse.Namespace(
        budget_s=1.0, logs=tmp_path / "logs", in_process=False, profile=None, profiled=set()
    )
    rows = tt.run_all([tt.BY_NAME["base512_m64"], tt.BY_NAME["hf_base512_m64"]], opts)
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert not list((tmp_path / "logs").iterdir())


def test_a_broken_model_option_skips_its_later_cases(tmp_path: Path, monkeypatch) -> None:
    """A case failing (not for memory) skips the later cases that use all of its model options; the
    others still run, and an out-of-memory failure blocks nothing."""
    ran: list[str] = []

    def fake_run_case(c, opts):
        ran.append(c.name)
        if c.name == "base512_m64_varlen":
            raise RuntimeError("flash varlen: no kernel image")
        if c.name == "large512_m32_z1_unpad":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"case": c.name, "status": "ok"}

    monkeypatch.setattr(tt, "run_case", fake_run_case)
    monkeypatch.setattr(tt, "_release", lambda: None)
    names = ["large512_m32_z1_unpad", "base512_m64_unpad", "base512_m64_varlen", "base512_m128_z1_varlen",
             "base512_m64_unpad", "base512_m64_attn_nodrop", "base512_m64"]
    opts = argparse.Namespace(
        budget_s=0, logs=tmp_path / "logs", in_process=True, profile=None, profiled=set()
    )
    rows = tt.run_all([tt.BY_NAME[n] for n in names], opts)
    assert ran == ["large512_m32_z1_unpad", "base512_m64_unpad", "base512_m64_varlen",
                   "base512_m64_attn_nodrop", "base512_m64"]
    assert [r["status"] for r in rows] == ["failed", "ok", "failed", "skipped", "skipped", "ok", "ok"]
    assert "base512_m64_varlen failed" in rows[3]["error"] and "attention_kernel" in rows[3]["error"]


def test_smoke_cases_fit_the_tiny_model() -> None:
    from roberta_ds.config import PRESETS

    for c in cases.CASES:
        s = cases.smoke_case(c)
        assert s.model == "tiny" and s.seq <= PRESETS["tiny"].max_seq_len and s.micro >= 1 and not s.compile


def test_compile_options_go_with_compilation_only() -> None:
    """A case's inductor options reach the trainer when it compiles; an eager run (which would refuse
    them) drops them."""
    from ours_case import trainer_argv

    c = cases.BY_NAME["base512_m128_z1_cdt"]
    assert c.sets == cases.CDT and c.compile
    eager = cases.resolve(c, argparse.Namespace(smoke=True, compile=None))
    compiled = cases.resolve(c, argparse.Namespace(smoke=True, compile=True))
    assert eager.sets == () and compiled.sets == cases.CDT
    argv = trainer_argv(compiled, Path("tok"), Path("train"), Path("out"), 0)
    assert argv[argv.index(cases.CDT[0]) - 1] == "--set"
    assert str(REPO / "ds_configs" / "zero1_bf16.json") in argv  # the shipped config of its stage


def test_host_ops_smoke(tmp_path: Path) -> None:
    """bench/host_ops.py: each stage through the real trainer in its own process; exact op counts."""
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "host_ops.py"), "--stages", "1", "2", "--layers", "2",
         "--accum", "3", "--steps", "1", "--work", str(tmp_path / "w"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=launcher_env(), check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    z1, z2 = json.loads(out.read_text())
    assert (z1["stage"], z2["stage"]) == (1, 2) and z1["params"] == z2["params"] == 34  # 2 layers x 12 + 10
    assert z1["model_ops"] == z2["model_ops"] > 0
    # DeepSpeed's ZeRO-2 does per-parameter bucket work at every micro-batch; ZeRO-1 accumulates only.
    assert 0 < z1["ds_ops_per_micro"] < z2["ds_ops_per_micro"]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("ZeRO-2") and "baseline" in lines[-1] and "x less" in lines[-2]


def test_gpu_session_reads_pytest_verdicts_and_keeps_a_lever_only_past_the_noise() -> None:
    """bench/gpu_session.py's decisions: a lever joins the combined case only if it beat the baseline
    of the same call by more than NOISE; a case that failed or never ran never wins."""
    import gpu_session as gs

    log = ("tests/a.py::test_x PASSED [ 50%]\ntests/b.py::test_y[fp16] FAILED [100%]\n"
           "tests/c.py::test_z \n== 1 failed, 1 passed ==")
    assert gs.parse_verdicts(log) == {"tests/a.py::test_x": "PASSED", "tests/b.py::test_y[fp16]": "FAILED"}
    rows = [{"case": "base", "status": "ok", "tokens_per_s": 100.0},
            {"case": "lever", "status": "ok", "tokens_per_s": 100.0 * (1 + gs.NOISE) + 0.1},
            {"case": "close", "status": "ok", "tokens_per_s": 100.0 * (1 + gs.NOISE)},
            {"case": "broken", "status": "timeout"}]
    assert gs.beats(rows, "lever", "base")
    assert not gs.beats(rows, "close", "base") and not gs.beats(rows, "broken", "base")
    assert not gs.beats(rows, "missing", "base") and not gs.beats(rows, "lever", "missing")
