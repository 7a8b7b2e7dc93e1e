"""The final table of bench/train_throughput.py, formatted from the rows alone (pure; unit-tested).

One line per throughput case with tokens/s, seq/s, MFU, peak memory, the share of a step outside
forward+backward, recompiles, the ratios against Hugging Face (same model/seq/micro under DeepSpeed,
and the fastest HF row of that model/seq) and the goal (GPU only); then a detail line per `ours` case,
the parity verdict, and one line per failed, timed-out or skipped case.
"""

from __future__ import annotations

from typing import Any


def fmt_rate(x: float | None) -> str:
    """Tokens or samples per second: "612.3K" from 10,000 up, else a whole number; "-" when absent."""
    if x is None:
        return "-"
    return f"{x / 1e3:,.1f}K" if x >= 1e4 else f"{x:,.0f}"


def fmt_pct(x: float | None) -> str:
    """A share in [0, 1] as a percentage with one decimal; "-" when absent."""
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(rows: list[dict[str, Any]], gpu: bool) -> str:
    """The final table: one line per case, ratios against HF under DeepSpeed (same model, seq and
    micro batch) and against the best HF row of the same model and seq; goals only on a GPU."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("impl") in ("ours", "hf_ds", "hf_compiled")]

    def hf_same(r: dict[str, Any]) -> float | None:
        for h in ok:
            if h["impl"] == "hf_ds" and (h["model"], h["seq"], h["micro"]) == (
                r["model"],
                r["seq"],
                r["micro"],
            ):
                return h["tokens_per_s"]
        return None

    def hf_best(r: dict[str, Any]) -> float | None:
        base = r["model"].split(",")[0]
        hs = [
            h["tokens_per_s"]
            for h in ok
            if h["impl"].startswith("hf")
            and h is not r
            and h["model"].split(",")[0] == base
            and h["seq"] == r["seq"]
        ]
        return max(hs) if hs else None

    head = (
        f"{'case':<26}{'impl':<12}{'model':<28}{'seq':>5}{'micro':>6}{'acc':>4}{'tokens/s':>10}{'seq/s':>9}"
        f"{'MFU':>7}{'peak GiB':>9}{'out f/b':>8}{'recomp':>7}{'xHF-DS':>8}{'xHFbest':>8}  goal"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("impl") == "parity" or r.get("status") != "ok":
            continue
        same, best = hf_same(r), hf_best(r)
        x_same = f"{r['tokens_per_s'] / same:.2f}x" if same and r["impl"] != "hf_ds" else "-"
        x_best = f"{r['tokens_per_s'] / best:.2f}x" if best else "-"
        goal = "-"
        if r.get("goal") and r["impl"] == "ours":
            goal = (
                ("PASS" if r["tokens_per_s"] >= r["goal"] else "miss") + f" >={fmt_rate(r['goal'])}"
                if gpu
                else "n/a (CPU)"
            )
        peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"{r['case']:<26}{r['impl']:<12}{r['model']:<28}{r['seq']:>5}{r['micro']:>6}{r['accum']:>4}"
            f"{fmt_rate(r['tokens_per_s']):>10}{r['samples_per_s']:>9,.0f}{fmt_pct(r.get('mfu')):>7}{peak:>9}"
            f"{fmt_pct(r.get('outside_fb_share')):>8}{r.get('recompiles', 0):>7}{x_same:>8}{x_best:>8}  {goal}"
        )
    lines += [
        "",
        (
            "tokens/s: median window; ours counts non-padding tokens (fill below), HF rows have no "
            "padding (seq/s x seq = positions/s, as the anchors count). MFU: model FLOPs/token (ours: "
            "LM head on the K/T masked slots; HF: full logits) / peak."
        ),
        (
            "out f/b: share of an optimizer step outside forward+backward (data + optimizer), from the "
            "timed pass. xHF-DS: vs HF+DeepSpeed, same model/seq/micro; xHFbest: vs the fastest HF row "
            "of that model/seq."
        ),
        "",
    ]
    for r in rows:
        if r.get("status") == "ok" and r.get("impl") == "ours" and "timed_tokens_per_s" in r:
            syncs = "-" if r.get("syncs_per_step") is None else str(r["syncs_per_step"])
            accum = f"{r['grad_accum']}; " if r.get("grad_accum") else ""
            sets = "".join(f"{s} " for s in [*r.get("ds_sets", []), *r.get("sets", [])])
            how = f"{r['precision']} ZeRO-{r['zero']} {accum}{sets}" + (
                f"compiled ({r['graphs']} graph(s))" if r["compile"] else "eager"
            )
            lines.append(
                f"{r['case']:<26}{how}; fill {fmt_pct(r['fill'])}; loss {r['loss']:.3f}; "
                f"first step {r['first_step_s']:.0f} s; data {fmt_pct(r['data_share'])} + optimizer "
                f"{fmt_pct(r['optimizer_share'])} of a step (timed pass "
                f"{fmt_rate(r['timed_tokens_per_s'])}/s); "
                f"windows {fmt_rate(r['tokens_per_s_min'])}..{fmt_rate(r['tokens_per_s_max'])}; "
                f"syncs/step {syncs} ({r['micro_per_step']} micro)"
                + (f"; loss scale {r['loss_scale']:g}, {r['skipped_steps']} step(s) skipped"
                   if r["precision"] == "ds-fp16" and r.get("loss_scale") is not None else "")
            )
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['case']:<26}{r.get('status', '?').upper()}: {r.get('error', '')[:300]}")
        elif r.get("impl") == "parity":
            gaps = ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(r["ours_losses"], r["ref_losses"]))
            lines.append(
                f"{r['case']:<26}{'OK' if r['ok'] else 'FAILED'}: ours/fp32 loss per step {gaps}; max gap "
                f"{100 * r['max_rel_gap']:.2f}% (tol {100 * r['rtol']:g}%), update cosine "
                f"{r['update_cosine']:.4f} (min {r['min_cosine']}), recompiles {r['recompiles']}"
            )
    return "\n".join(lines)
