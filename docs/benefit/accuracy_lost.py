"""Accuracy *lost* to weight noise and quantisation, against AdamW, from the benefit benchmark's results files.

The tables of docs/benefit.md give each method's held-out accuracy after a perturbation and its difference to AdamW
*after* the perturbation ("Δ 4-bit vs AdamW"). A method that starts higher can keep more after the perturbation while
losing as much. This script gives the other reading: per run, lost = held-out accuracy − accuracy after the
perturbation; then, per method, the paired difference of what it lost to what AdamW lost at the same seed (positive:
the method loses more), with the 95% t interval that `benchmarks/bench_benefit.py` uses (its `paired`), next to the
difference after the perturbation. Points, i.e. percentage points of held-out accuracy.

    python docs/benefit/accuracy_lost.py --task smollm --noise 0.0
    python docs/benefit/accuracy_lost.py --task smollm --noise 0.0 --methods msam \
        --files docs/benefit/results.json docs/benefit/extra_seeds.json     # the five-seed rows
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "docs" / "benefit" / "results.json"]
MEASURES = ("noise_0.05", "noise_0.1", "noise_0.2", "int8", "int4")


def load_bench():
    """benchmarks/bench_benefit.py, imported by path (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("hf_sam_bench_benefit", ROOT / "benchmarks" / "bench_benefit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fmt(d: dict) -> str:
    """A paired difference as hf_sam's statistics module writes it ("—" where no seed had the measure)."""
    from hf_sam.compare.stats import format_diff

    return format_diff(None if math.isnan(d["mean"]) else d)


def rows(runs: list[dict], task: str, noise: float, methods: list[str] | None, measures: list[str], paired) -> list:
    groups: dict[str, dict[int, dict]] = {}
    for r in runs:
        if r["task"] == task and math.isclose(r["noise"], noise):
            groups.setdefault(r["method"], {})[r["seed"]] = r
    base = groups.get("adamw", {})
    out = []
    for method in methods or [m for m in groups if m != "adamw"]:
        for measure in measures:
            runs_m = {s: r for s, r in groups.get(method, {}).items() if measure in r}
            base_m = {s: r for s, r in base.items() if measure in r}
            seeds = sorted(set(runs_m) & set(base_m))
            if not seeds:
                continue
            lost = {s: runs_m[s]["accuracy"] - runs_m[s][measure] for s in seeds}
            base_lost = {s: base_m[s]["accuracy"] - base_m[s][measure] for s in seeds}
            after = {s: runs_m[s][measure] for s in seeds}
            base_after = {s: base_m[s][measure] for s in seeds}
            out.append(
                {
                    "method": method,
                    "measure": measure,
                    "seeds": len(seeds),
                    "adamw_lost": sum(base_lost.values()) / len(seeds),
                    "lost": sum(lost.values()) / len(seeds),
                    "lost_diff": paired(lost, base_lost),
                    "after_diff": paired(after, base_after),
                }
            )
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", nargs="+", type=Path, default=FILES, help="results.json files (runs merged).")
    p.add_argument("--task", required=True, help="digits, minilm or smollm.")
    p.add_argument("--noise", type=float, required=True, help="The training label-noise setting.")
    p.add_argument("--methods", nargs="+", default=None, help="Default: every method of the setting but AdamW.")
    p.add_argument("--measures", nargs="+", default=list(MEASURES), help=f"Default: {' '.join(MEASURES)}.")
    opts = p.parse_args(argv)
    bench = load_bench()
    runs = []
    for path in opts.files:
        runs += json.loads(path.read_text())["runs"]
    runs = list({(r["task"], r["noise"], r["method"], r["seed"]): r for r in reversed(runs)}.values())
    # one run per (task, noise, method, seed), the first one, as `--merge` keeps
    table = rows(runs, opts.task, opts.noise, opts.methods, opts.measures, bench.paired)
    print(f"{opts.task}, label noise {opts.noise:g}: points of held-out accuracy; Δ = method − AdamW, paired by seed")
    print("| method | measure | seeds | AdamW loses | method loses | Δ lost [95% CI] | Δ after [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['method']} | {r['measure']} | {r['seeds']} | {100 * r['adamw_lost']:.1f} | {100 * r['lost']:.1f} "
            f"| {fmt(r['lost_diff'])} | {fmt(r['after_diff'])} |"
        )
    return table


if __name__ == "__main__":
    main()
