"""Turning measurements into the report: a JSON-able dict, its headline numbers, gates, a table.

Every report carries ``headline``: a flat ``{name: number}`` of the values users gate on in CI
(``--fail-above kl=0.05``). Keeping gates on that one dict means any measure shown can be gated
and a misspelt name can be answered with the list of valid ones.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
from rich.console import Console
from rich.table import Table

from mlcompress.divergence.llamacpp_stats import DELTA_P_PERCENTILES, KLD_PERCENTILES, statistics
from mlcompress.divergence.lm import LmComparison
from mlcompress.divergence.measures import TokenMeasures
from mlcompress.divergence.stats import PERCENTILES, binomial_rate, perplexity, rms, summarize
from mlcompress.errors import GateFailed, UsageError


def measure_block(m: TokenMeasures) -> dict[str, Any]:
    """Statistics shared by every mode: KL with percentiles, reverse KL, JS, TV, same-top."""
    n = int(m.kl.numel())
    same = int(m.same_top.sum())
    rate, rate_se = binomial_rate(same, n)
    return {
        "positions": n,
        "kl": summarize(m.kl.numpy()).as_dict(),
        "reverse_kl": summarize(m.rkl.numpy(), percentiles=False).as_dict(),
        "js": summarize(m.js.numpy(), percentiles=False).as_dict(),
        "tv": summarize(m.tv.numpy(), percentiles=False).as_dict(),
        "same_top": {"rate": rate, "stderr": rate_se, "count": same},
    }


def headline_from_block(block: dict[str, Any]) -> dict[str, float]:
    out = {
        "kl": block["kl"]["mean"],
        "reverse_kl": block["reverse_kl"]["mean"],
        "js": block["js"]["mean"],
        "tv": block["tv"]["mean"],
        "same_top": block["same_top"]["rate"],
    }
    for label, value in block["kl"]["percentiles"].items():
        out[f"kl_{label}"] = value
    return out


def lm_report(comp: LmComparison, *, ref: str, cmp: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The data-mode report for language models."""
    m = comp.measures
    block = measure_block(m)
    ref_p = m.ref_logp.double().exp().numpy()
    cmp_p = m.cmp_logp.double().exp().numpy()
    dp = cmp_p - ref_p
    delta_p = summarize(dp).as_dict()
    delta_p["rms"] = rms(dp)
    ppl = perplexity(m.ref_logp.numpy(), m.cmp_logp.numpy()).as_dict()
    t = comp.timer
    total = t.forward_s + t.measures_s if t else math.nan
    report = {
        "mode": "data",
        "ref": ref,
        "cmp": cmp,
        "settings": settings,
        "documents": len(comp.sequences),
        "windows": comp.windows,
        "vocab": {"ref": comp.vocab_ref, "cmp": comp.vocab_cmp, "compared": comp.vocab_compared},
        **block,
        "delta_p": delta_p,
        "ppl": ppl,
        "sequences": [
            {"doc": s.doc, "tokens": s.tokens, "loglik_ref": s.ref, "loglik_cmp": s.cmp}
            for s in comp.sequences
        ],
        "timing": {
            "forward_s": t.forward_s if t else math.nan,
            "measures_s": t.measures_s if t else math.nan,
            "forward_cpu_s": t.forward_cpu_s if t else math.nan,
            "measures_cpu_s": t.measures_cpu_s if t else math.nan,
            "tokens_per_s": block["positions"] / total if total > 0 else math.nan,
        },
        "notes": list(comp.notes),
    }
    headline = headline_from_block(block)
    headline.update(
        {
            "delta_p_rms": delta_p["rms"],
            "delta_p_mean": delta_p["mean"],
            "ppl_ref": ppl["ref"],
            "ppl_cmp": ppl["cmp"],
            "ppl_ratio": ppl["ratio"],
            "ln_ppl_ratio": ppl["ln_ratio"],
        }
    )
    for label, value in delta_p["percentiles"].items():
        headline[f"delta_p_{label}"] = value
    for name in comp.missing:  # what the reference side cannot provide is null, not a number
        report[name] = None
        headline.pop(name, None)
    if comp.llama_cpp is not None:
        report["llama_cpp"] = statistics(comp.llama_cpp)
        if not comp.missing:
            report["notes"].append(LLAMA_CPP_NOTE)
        report["notes"] += comp.llama_cpp.notes
        headline.update(llama_cpp_headline(report["llama_cpp"]))
    report["headline"] = headline
    return report


#: What the ``llama_cpp`` block is, in words (the report says which KL is which).
LLAMA_CPP_NOTE = (
    "llama_cpp: llama.cpp's --kl-divergence figures, computed its way against the reference "
    "log-probs as its .kld file stores them (16-bit codes over 16 nats below the top; KL summed "
    "over tokens with base log-prob above -16); kl is our exact full-vocabulary KL"
)


def llama_cpp_headline(block: dict[str, Any]) -> dict[str, float]:
    """Gate names for the llama.cpp figures: ``llama_cpp_kld``, ``llama_cpp_kld_p99``, ..."""
    out = {
        "llama_cpp_kld": block["kld"]["mean"],
        "llama_cpp_same_top": block["same_top"]["value"],
        "llama_cpp_delta_p_rms": block["rms_delta_p"]["value"],
        "llama_cpp_ln_ppl_ratio": block["ln_ppl_ratio"]["value"],
        "llama_cpp_ppl_cmp": block["ppl_cmp"]["value"],
    }
    if block["summary"]:
        out["llama_cpp_ppl_base"] = block["ppl_base"]["value"]
        out["llama_cpp_ppl_ratio"] = block["ppl_ratio"]["value"]
        for label, value in block["kld"]["percentiles"].items():
            out[f"llama_cpp_kld_{label}"] = value
    return out


# --- gates -----------------------------------------------------------------------------------


def parse_gates(specs: Iterable[str]) -> dict[str, float]:
    """``["kl=0.05", "js=0.01"]`` -> ``{"kl": 0.05, "js": 0.01}`` (names checked later)."""
    gates: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip().replace("-", "_")
        try:
            threshold = float(value)
        except ValueError:
            threshold = math.nan
        if not sep or not name or not math.isfinite(threshold):
            raise UsageError(
                f"--fail-above {spec!r} is not NAME=NUMBER", hint="for example --fail-above kl=0.05"
            )
        gates[name] = threshold
    return gates


def check_gates(report: dict[str, Any], gates: dict[str, float]) -> None:
    """Record each gate's outcome in ``report["gates"]``; raise :class:`GateFailed` (exit 3) if
    any measured value exceeds its threshold. Unknown names are usage errors."""
    headline = report["headline"]
    unknown = [name for name in gates if name not in headline]
    if unknown:
        raise UsageError(
            f"--fail-above: unknown measure {unknown[0]!r}",
            hint=f"known: {', '.join(sorted(headline))}",
        )
    outcomes = {}
    failed = []
    for name, threshold in gates.items():
        value = headline[name]
        ok = value is not None and not (isinstance(value, float) and math.isnan(value)) and value <= threshold
        outcomes[name] = {"value": value, "threshold": threshold, "passed": bool(ok)}
        if not ok:
            failed.append(f"{name} = {value:.6g} > {threshold:g}")
    report["gates"] = outcomes
    if failed:
        raise GateFailed("divergence gate failed: " + "; ".join(failed))


# --- rendering -------------------------------------------------------------------------------


def _pm(mean: float, se: float, scale: float = 1.0, digits: int = 6) -> str:
    return f"{mean * scale:.{digits}g} ± {se * scale:.2g}"


def render(report: dict[str, Any], console: Console) -> None:
    """A rich table in the spirit of llama.cpp's KL report."""
    title = f"{report['ref']}  vs  {report['cmp']}  ({report['mode']} mode)"
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    if report["mode"] in ("data", "classifier"):
        _render_block(table, report)
    else:
        _render_sequence(table, report)
    gates = report.get("gates") or {}
    for name, g in gates.items():
        verdict = "[green]pass[/]" if g["passed"] else "[red]FAIL[/]"
        table.add_row(f"gate {name} <= {g['threshold']:g}", f"{g['value']:.6g} {verdict}")
    console.print(table)
    if report.get("llama_cpp"):
        console.print(_llama_cpp_table(report["llama_cpp"]))
    for note in report.get("notes", []):
        console.print(f"note: {note}")


def _render_block(table: Table, r: dict[str, Any]) -> None:
    if r["mode"] == "classifier":
        table.add_row("examples", f"{r['positions']:,}")
        table.add_row("accuracy ref", _pm(r["accuracy"]["ref"], r["accuracy"]["ref_stderr"], 100, 4) + " %")
        table.add_row("accuracy cmp", _pm(r["accuracy"]["cmp"], r["accuracy"]["cmp_stderr"], 100, 4) + " %")
        table.add_row("flips correct→wrong", f"{r['flips']['correct_to_wrong']:,}")
        table.add_row("flips wrong→correct", f"{r['flips']['wrong_to_correct']:,}")
    else:
        table.add_row("scored tokens", f"{r['positions']:,} in {r['windows']:,} windows")
        p = r["ppl"]
        table.add_row("PPL ref", _pm(p["ref"], p["ref_stderr"]))
        table.add_row("PPL cmp", _pm(p["cmp"], p["cmp_stderr"]))
        table.add_row("PPL ratio cmp/ref", f"{p['ratio']:.6g}")
        table.add_row("mean ln(PPL cmp/ref)", _pm(p["ln_ratio"], p["ln_ratio_stderr"]))
        table.add_row("cor(ln p ref, ln p cmp)", f"{p['correlation']:.4%}")
    kl = r["kl"]
    table.add_row("mean KL(ref‖cmp)", _pm(kl["mean"], kl["stderr"]))
    for label, _ in PERCENTILES:
        if label in kl["percentiles"]:
            table.add_row(f"  KL {label}", f"{kl['percentiles'][label]:.6g}")
    for key, label in (("reverse_kl", "mean KL(cmp‖ref)"), ("js", "mean JS"), ("tv", "mean total variation")):
        if r.get(key) is not None:
            table.add_row(label, _pm(r[key]["mean"], r[key]["stderr"]))
    st = r["same_top"]
    table.add_row("same top", _pm(st["rate"], st["stderr"], 100, 5) + " %")
    if r["mode"] == "data":
        dp = r["delta_p"]
        table.add_row("mean Δp", _pm(dp["mean"], dp["stderr"], 100, 4) + " %")
        table.add_row("RMS Δp", f"{dp['rms'] * 100:.4g} %")
        for label, _ in PERCENTILES:
            table.add_row(f"  Δp {label}", f"{dp['percentiles'][label] * 100:.4g} %")


def _llama_cpp_table(b: dict[str, Any]) -> Table:
    """llama.cpp's own summary, with its labels, units (%) and precision."""
    table = Table(title="llama.cpp --kl-divergence figures (against the 16-bit base)", header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    pm = lambda v, digits=6, scale=1.0: f"{v['value'] * scale:.{digits}f} ± {v['uncertainty'] * scale:.{digits}f}"  # noqa: E731
    table.add_row("scored tokens", f"{b['positions']:,} in {b['chunks']:,} chunks of {b['ctx']}")
    table.add_row("Mean PPL(Q)", pm(b["ppl_cmp"]))
    if b["summary"]:
        table.add_row("Mean PPL(base)", pm(b["ppl_base"]))
        table.add_row("Cor(ln(PPL(Q)), ln(PPL(base)))", f"{100 * b['ln_ppl_correlation']:.2f}%")
    table.add_row("Mean ln(PPL(Q)/PPL(base))", pm(b["ln_ppl_ratio"]))
    if b["summary"]:
        table.add_row("Mean PPL(Q)/PPL(base)", pm(b["ppl_ratio"]))
        table.add_row("Mean PPL(Q)-PPL(base)", pm(b["ppl_difference"]))
    kld = b["kld"]
    table.add_row("Mean KLD", f"{kld['mean']:.6f} ± {kld['uncertainty']:.6f}")
    for label, _ in KLD_PERCENTILES if b["summary"] else ():
        table.add_row(f"  KLD {label}", f"{kld['percentiles'][label]:.6f}")
    if b["summary"]:
        dp = b["delta_p"]
        table.add_row("Mean Δp", f"{100 * dp['mean']:.3f} ± {100 * dp['uncertainty']:.3f} %")
        for label, _ in DELTA_P_PERCENTILES:
            table.add_row(f"  Δp {label}", f"{100 * dp['percentiles'][label]:.3f}%")
    table.add_row("RMS Δp", pm(b["rms_delta_p"], 3, 100.0) + " %")
    table.add_row("Same top p", pm(b["same_top"], 3, 100.0) + " %")
    if not b["summary"]:
        table.add_row("summary", f"not printed by llama.cpp below 100 tokens ({b['positions']})")
    return table


def _render_sequence(table: Table, r: dict[str, Any]) -> None:
    table.add_row("sequence length", str(r["length"]))
    for key, label in (
        ("joint_kl", "KL(ref‖cmp) of length-L sequences"),
        ("per_token_kl", "  per token (÷ L)"),
        ("joint_kl_logratio", "  plain log-ratio estimate"),
        ("joint_reverse_kl", "KL(cmp‖ref) of sequences"),
        ("joint_js", "JS of sequences"),
        ("joint_tv", "total variation of sequences"),
        ("per_token_js", "mean JS per position"),
        ("per_token_tv", "mean total variation per position"),
        ("same_top", "same top per position"),
    ):
        if key in r:
            v = r[key]
            if isinstance(v, dict):
                table.add_row(label, _pm(v["mean"], v["stderr"]))
            else:
                table.add_row(label, f"{v:.6g}")
    if "samples" in r:
        table.add_row("samples", f"{r['samples']:,}")
    if "sequences" in r and isinstance(r["sequences"], int):
        table.add_row("sequences enumerated", f"{r['sequences']:,}")
    for i, value in enumerate(r.get("kl_by_position", []), start=1):
        table.add_row(f"  E[KL] at position {i}", f"{value:.6g}")


def per_token_arrays(m: TokenMeasures) -> dict[str, np.ndarray]:
    """Per-position values kept for plots (not part of the JSON report)."""
    return {"kl": m.kl.numpy(), "js": m.js.numpy()}
