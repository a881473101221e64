"""Statistics over seeds, shared by `hf-sam compare` and `benchmarks/bench_benefit.py`.

Each run is a record (a dict) with a method, a seed and its measures. Runs are grouped (by method; the benchmark also
by task and label noise), and each group gets, for every measure, its mean and sample standard deviation over seeds
and the difference to the baseline method *paired by seed* (the mean over the seeds both ran of method - baseline),
with a 95% interval from Student's t distribution with n - 1 degrees of freedom. Cost is the mean over seeds of each
run's cost divided by the baseline's at the same seed (`cost_ratios`: optionally only on the same machine, and over
the baseline's mean where it lacks the seed).

The t quantile is scipy's (`scipy.stats.t.ppf`), imported when an interval is computed: this module imports without
scipy, and a summary with one seed per group (no interval) needs none. `require_scipy` raises the error that says how
to install it (`hf-sam compare` calls it before any run starts).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "common_keys",
    "cost_ratios",
    "format_diff",
    "format_value",
    "markdown_table",
    "paired_difference",
    "plot_benefit_vs_cost",
    "require_scipy",
    "summarize",
    "t975",
    "t_quantile",
]


# ---- Student's t quantile -------------------------------------------------------------------------------------------
SCIPY_MISSING = (
    "the 95% t intervals need scipy (scipy.stats.t.ppf): `pip install scipy`, or hf_sam's analysis extra "
    '(`pip install -e ".[analysis]"` in a checkout).'
)


def require_scipy() -> Any:
    """`scipy.stats`, imported; an `ImportError` that says how to install scipy when it is missing."""
    try:
        import scipy.stats
    except ImportError as err:
        raise ImportError(SCIPY_MISSING) from err
    return scipy.stats


def t_quantile(p: float, df: float) -> float:
    """The `p` quantile of Student's t distribution with `df` degrees of freedom: `scipy.stats.t.ppf` (needs scipy)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0; got p={p!r}, df={df!r}.")
    return float(require_scipy().t.ppf(p, df))


def t975(df: float) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom: the half-width factor of a 95% interval."""
    return t_quantile(0.975, df)


# ---- paired differences and summaries -------------------------------------------------------------------------------
def paired_difference(values: Mapping[Hashable, float], base: Mapping[Hashable, float]) -> dict[str, float]:
    """Mean difference to the baseline over the seeds both have, with its 95% t interval.

    Args:
        values (`Mapping`): A measure of one method, by seed.
        base (`Mapping`): The same measure of the baseline, by seed.

    Returns:
        `dict`: `mean` (of values[s] - base[s]), `n` (the seeds both have), `low` and `high` (the 95% interval
        mean ± t(0.975, n - 1) · sd / √n, which needs scipy; NaN with fewer than two seeds).
    """
    diffs = [values[s] - base[s] for s in values if s in base]
    out = {"mean": statistics.fmean(diffs) if diffs else float("nan"), "n": len(diffs)}
    if len(diffs) >= 2:
        half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        out.update(low=out["mean"] - half, high=out["mean"] + half)
    else:
        out.update(low=float("nan"), high=float("nan"))
    return out


def common_keys(records: Sequence[Mapping[str, Any]], candidates: Iterable[str]) -> list[str]:
    """The `candidates` (in their order) that every record has: a mean over fewer seeds than the group's would
    mislead, so a measure that some runs lack is left out of the group's row."""
    return [k for k in candidates if all(k in r for r in records)]


KeysOf = Sequence[str] | Callable[[list[dict]], Sequence[str]]
UNPAIRED = ("skip", "mean")


def cost_ratios(
    records: Sequence[dict],
    *,
    cost_key: str,
    group_by: Sequence[str] = ("method",),
    method_key: str = "method",
    seed_key: str = "seed",
    baseline: str = "adamw",
    cost_match: Sequence[str] = (),
    cost_unpaired: str = "skip",
) -> list[float | None]:
    """Each run's cost over the baseline's, in `records`' order.

    A run is divided by the baseline's run with the same seed, the same other `group_by` fields and the same
    `cost_match` fields (a missing field counts as None, so runs recorded without it count as one machine). Where
    the baseline lacks that run, `cost_unpaired="mean"` divides by the mean of the baseline's runs that share the
    group and the `cost_match` fields instead; `"skip"` gives None, as does a run without the cost or without any
    baseline run to divide by.

    Args:
        cost_key (`str`): The per-run cost (time per step).
        cost_match (`Sequence[str]`, defaults to `()`): Fields a run and the runs it is divided by must share: the
            machine, since the same step takes 10-20% longer on one machine than on another, more than some
            variants' overhead.
        cost_unpaired (`str`, defaults to `"skip"`): `"skip"` or `"mean"`, for a run whose seed the baseline lacks.
        group_by, method_key, seed_key, baseline: As in `summarize`.
    """
    if cost_unpaired not in UNPAIRED:
        raise ValueError(f"cost_unpaired must be one of {UNPAIRED}; got {cost_unpaired!r}.")
    group_by, at = tuple(group_by), tuple(group_by).index(method_key)

    def place(r: Mapping[str, Any]) -> tuple:  # the run's group but for the method, and its machine
        return tuple(r.get(k) for i, k in enumerate(group_by) if i != at) + tuple(r.get(k) for k in cost_match)

    timed = [r for r in records if r[method_key] == baseline and r.get(cost_key) is not None]
    same_seed = {(place(r), r[seed_key]): r[cost_key] for r in timed}
    same_place: dict[tuple, list[float]] = {}
    for r in timed:
        same_place.setdefault(place(r), []).append(r[cost_key])
    ratios: list[float | None] = []
    for r in records:
        base = same_seed.get((place(r), r[seed_key]))
        if base is None and cost_unpaired == "mean" and place(r) in same_place:
            base = statistics.fmean(same_place[place(r)])
        ratios.append(r[cost_key] / base if base and r.get(cost_key) is not None else None)
    return ratios


def summarize(
    records: Sequence[dict],
    *,
    metrics: KeysOf,
    group_by: Sequence[str] = ("method",),
    method_key: str = "method",
    seed_key: str = "seed",
    baseline: str = "adamw",
    compared: KeysOf | None = None,
    cost_key: str | None = None,
    cost_match: Sequence[str] = (),
    cost_unpaired: str = "skip",
    order: Sequence[str] = (),
) -> list[dict]:
    """One row per group of runs: mean and spread over seeds, paired differences to the baseline, cost.

    Args:
        records (`Sequence[dict]`): One dict per run with the `group_by` fields, `seed_key` and the measures.
        metrics (`Sequence[str]` or callable): The measures of a group's row, or a function of the group's runs that
            names them.
        group_by (`Sequence[str]`, defaults to `("method",)`): The fields that make a group; `method_key` among them.
        method_key (`str`, defaults to `"method"`): The field naming the method.
        seed_key (`str`, defaults to `"seed"`): The field that pairs a run with the baseline's.
        baseline (`str`, defaults to `"adamw"`): The method the differences and the cost are relative to (the group
            with the same other `group_by` fields).
        compared (`Sequence[str]` or callable, *optional*): The measures that get a paired difference, or a function
            of the baseline's runs that names them; default: every one of `metrics`. A measure gets a difference only
            where the baseline's group has runs and the group is not the baseline's.
        cost_key (`str`, *optional*): A per-run cost (time per step); the row gets its mean (under the same key,
            runs without it skipped) and `cost_x_<baseline>`, the mean over seeds of `cost_ratios` (by default the
            run's cost over the baseline's at the same seed; NaN where no run has a ratio).
        cost_match (`Sequence[str]`, defaults to `()`), cost_unpaired (`str`, defaults to `"skip"`): How a run's
            cost is paired with the baseline's (`cost_ratios`).
        order (`Sequence[str]`, defaults to `()`): Methods in the order of the rows; others follow, in the order they
            first appear.

    Returns:
        `list[dict]`: rows with the `group_by` fields, `seeds` (sorted) and per measure a dict with `mean`, `sd`
        (sample standard deviation; NaN for one seed), `values` (in run order) and, where compared, `diff`
        (`paired_difference`).
    """
    group_by = tuple(group_by)
    at = group_by.index(method_key)
    ratio: dict[int, float | None] = {}
    if cost_key is not None:
        costs = cost_ratios(
            records,
            cost_key=cost_key,
            group_by=group_by,
            method_key=method_key,
            seed_key=seed_key,
            baseline=baseline,
            cost_match=cost_match,
            cost_unpaired=cost_unpaired,
        )
        ratio = {id(r): c for r, c in zip(records, costs)}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in group_by), []).append(r)
    rows = []
    for key, runs in groups.items():
        base_key = key[:at] + (baseline,) + key[at + 1 :]
        base_runs = {r[seed_key]: r for r in groups.get(base_key, [])}
        row: dict[str, Any] = dict(zip(group_by, key))
        row["seeds"] = sorted(r[seed_key] for r in runs)
        keys = list(metrics(runs) if callable(metrics) else metrics)
        compared_keys: set[str] = set()
        if base_runs and key[at] != baseline:
            if compared is None:
                compared_keys = set(keys)
            else:
                compared_keys = set(compared(list(base_runs.values())) if callable(compared) else compared)
        for k in keys:
            values = [r[k] for r in runs]
            row[k] = {
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
                "values": values,
            }
            if k in compared_keys:
                row[k]["diff"] = paired_difference(
                    {r[seed_key]: r[k] for r in runs}, {s: b[k] for s, b in base_runs.items()}
                )
        if cost_key is not None:
            costs = [ratio[id(r)] for r in runs if ratio[id(r)] is not None]
            row[f"cost_x_{baseline}"] = statistics.fmean(costs) if costs else float("nan")
            own = [r[cost_key] for r in runs if r.get(cost_key) is not None]
            row[cost_key] = statistics.fmean(own) if own else float("nan")
        rows.append(row)
    index = {m: i for i, m in enumerate(order)}
    return sorted(rows, key=lambda row: index.get(row[method_key], len(index)))


# ---- tables ---------------------------------------------------------------------------------------------------------
def format_value(x: float | None, scale: float = 100, spec: str = ".1f") -> str:
    """`x` times `scale` in format `spec` (default: a fraction as a percentage, one decimal); "—" for None / NaN."""
    return "—" if x is None or math.isnan(x) else f"{scale * x:{spec}}"


def format_diff(d: Mapping[str, float] | None, scale: float = 100, spec: str = "+.1f") -> str:
    """A paired difference as "mean [low, high]" (times `scale`), its mean alone without an interval, "—" without
    a difference."""
    if not d:
        return "—"
    if math.isnan(d["low"]):
        return f"{scale * d['mean']:{spec}}"
    return f"{scale * d['mean']:{spec}} [{scale * d['low']:{spec}}, {scale * d['high']:{spec}}]"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a markdown table: the header, its rule, then one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


# ---- figure ---------------------------------------------------------------------------------------------------------
def plot_benefit_vs_cost(
    rows: Sequence[dict],
    path: str | Path,
    *,
    metric: str,
    panel: Callable[[dict], Hashable] | None = None,
    title: Callable[[Hashable], str] | None = None,
    scale: float = 1.0,
    baseline: str = "adamw",
    method_key: str = "method",
    xlabel: str = "time per step, × AdamW",
    ylabel: str | None = None,
) -> None:
    """The paired difference of `metric` to the baseline (95% interval as error bars) against cost, one point per
    row, one panel per value of `panel(row)` (two panels a row); written to `path` (needs matplotlib)."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("The benefit-vs-cost figure needs matplotlib: `pip install matplotlib`.") from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cost = f"cost_x_{baseline}"
    panel = panel or (lambda row: None)
    settings = list(dict.fromkeys(panel(r) for r in rows))
    cols = min(2, len(settings))  # two panels a row: wide enough for the method labels
    rows_n = math.ceil(len(settings) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.4 * cols, 4.6 * rows_n), squeeze=False)
    for ax in axes.flat[len(settings) :]:
        ax.set_visible(False)
    for ax, setting in zip(axes.flat, settings):
        for r in rows:
            if panel(r) != setting or metric not in r:
                continue
            d = r[metric].get("diff") or {"mean": 0.0, "low": float("nan"), "high": float("nan")}
            y = scale * d["mean"]
            err = None if math.isnan(d["low"]) else [[y - scale * d["low"]], [scale * d["high"] - y]]
            ax.errorbar(r[cost], y, yerr=err, fmt="o", capsize=3)
            ax.annotate(r[method_key], (r[cost], y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(0, color="grey", lw=0.8)
        if title is not None:
            ax.set_title(title(setting))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel or f"{metric} − {baseline}")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
