"""The README's "which method when" table, computed from the benefit benchmark's result files; and the README's
first screen (status, the table, findings, install) mirrored into docs/index.md.

Every number in the table is a paired difference to AdamW over seeds with its 95% t interval (the statistics of
`hf_sam.compare.stats`, the same as docs/benefit.md's), read from the files under docs/benefit/; the step-time
ratio is the CPU time per step against AdamW's on the same task, seed and machine, averaged over seeds
(`bench_benefit.step_time_ratios`). The situations and the advice are declared below (ROWS); the measured numbers,
and those an advice quotes from the runs (`Row.fresh_from`), are not typed anywhere (tests/test_which_method.py
checks the advice's typed counts of runs). README.md carries the table between the markers
<!-- which-method:start --> and <!-- which-method:end -->, inside its first screen
(<!-- first-screen:start --> to <!-- first-screen:end -->), which docs/index.md repeats with its links made
relative to docs/.
tests/test_which_method.py fails when either file differs from what this script writes.

    python benchmarks/which_method.py          # rewrite the table in README.md and the first screen in docs/index.md
    python benchmarks/which_method.py --check  # exit 1, naming the file, when either is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from hf_sam.compare import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_benefit, beside this script, as it imports its tasks

import bench_benefit  # noqa: E402  (its rules of which runs a summary reports and of step-time ratios)

BENEFIT = ROOT / "docs" / "benefit"
FIRST_STUDY = [BENEFIT / "results.json", BENEFIT / "extra_seeds.json"]  # one rho per task; seeds 3, 4 in extra
TUNED_STUDY = [BENEFIT / "tuned" / "results.json"]  # rho chosen on validation; test-phase runs only
README, INDEX = ROOT / "README.md", ROOT / "docs" / "index.md"
START, END = "<!-- which-method:start -->", "<!-- which-method:end -->"
SCREEN_START, SCREEN_END = "<!-- first-screen:start -->", "<!-- first-screen:end -->"


@dataclass(frozen=True)
class Row:
    situation: str
    advice: str  # what to try, with its rho
    files: tuple[Path, ...]
    task: str
    noise: float
    method: str
    metric: str = "accuracy"
    reading: str = "accuracy"  # what the difference is a difference of; {base}: AdamW's mean, {rho}: the runs' rho
    phase: str | None = None  # "test" for the tuned study (its selection runs are on the validation split)
    scale: float = 100.0  # accuracies in points; 1.0 for a loss
    spec: str = "+.1f"
    # Seeds below this one found a lead that the seeds from it on were run to test: the advice may quote both parts,
    # as {found} (the first seeds' mean difference), {fresh} (the later seeds' difference and interval) and {n_fresh}.
    fresh_from: int | None = None

    def runs(self) -> list[dict]:
        """The row's runs as the benchmark reports them (a tuned study's test runs at the chosen rho only)."""
        return [
            r
            for path in self.files
            for r in reported_runs(path)
            if r["task"] == self.task and r["noise"] == self.noise and r.get("phase") == self.phase
        ]

    def against_early_stopping(self, advice: str, fresh_from: int | None = None) -> Row:
        """The same runs read at each run's best validation epoch: the comparison with AdamW stopped early."""
        return dataclasses.replace(
            self,
            situation="the same, against AdamW stopped early (both at their best validation epoch)",
            advice=advice,
            metric="test_at_best_val",
            reading="accuracy at the best validation epoch",
            fresh_from=fresh_from,
        )


@cache
def all_runs(path: Path) -> tuple[dict, ...]:
    """Every run of one result file, selection runs included, read once however many rows use it."""
    return tuple(json.loads(path.read_text())["runs"])


@cache
def reported_runs(path: Path) -> tuple[dict, ...]:
    """The runs of one result file that the benchmark reports (`bench_benefit.reported_runs`)."""
    return tuple(bench_benefit.reported_runs(list(all_runs(path))))


# The tuned study's two noisy-label rows, each also read against AdamW stopped early.
NOISY_LORA = Row(
    "Noisy labels, LoRA fine-tuning of a language model (SmolLM2 + LoRA, word sentiment, 40% wrong labels)",
    "SAM, ρ 1.0 on the adapters (chosen on validation; ≤ 0.1 trains as AdamW does)",
    tuple(TUNED_STUDY),
    "sentiment_smollm",
    0.4,
    "sam",
    phase="test",
)
NOISY_FULL = Row(
    "Noisy labels, full fine-tuning (MiniLM, word sentiment, 40% wrong labels)",
    "ASAM, ρ 1.0 (chosen on validation; at one class at the end: SAM at its 0.1 on 12 of 26 seeds, ASAM at 1.0 on 2 "
    "of 66, and at 45% wrong labels ASAM's 1.0 stayed at one class on 3 of 5: check every seed)",
    tuple(TUNED_STUDY),
    "sentiment_minilm",
    0.4,
    "asam",
    phase="test",
)

ROWS = [
    Row(
        "Labels you do not trust, model trained from scratch (small ResNet on digits, 40% wrong labels)",
        "SAM, ρ 0.1",
        tuple(FIRST_STUDY),
        "digits",
        0.4,
        "sam",
    ),
    Row(
        "the same, when SAM's step time is too much",
        "LookSAM, ρ 0.1 (vision only: see the last row)",
        tuple(FIRST_STUDY),
        "digits",
        0.4,
        "looksam",
    ),
    NOISY_LORA,
    NOISY_LORA.against_early_stopping(
        "SAM ρ 1.0 where no clean validation set can stop training; else AdamW with early stopping (half the cost)"
    ),
    NOISY_FULL,
    NOISY_FULL.against_early_stopping(
        "ASAM ρ 1.0 with early stopping (AdamW with it where ASAM's step time is too much): ASAM's lead over its "
        "first 16 seeds ({found}) was {fresh} on {n_fresh} fresh ones",
        fresh_from=16,
    ),
    Row(
        "LoRA fine-tuning that must not forget general text (SmolLM2 + LoRA, the noisy sentiment task)",
        "SAM, ρ 1.0 on the adapters",
        tuple(TUNED_STUDY),
        "sentiment_smollm",
        0.4,
        "sam",
        metric="forgetting",
        reading="nats of loss gained on text never trained on (AdamW: {base})",
        phase="test",
        scale=1.0,
        spec="+.2f",
    ),
    Row(
        "LoRA weights that must survive 4-bit quantisation (SmolLM2, clean answers)",
        "Momentum-SAM, ρ 0.05 (one untuned ρ, scored on 100 held-out prompts; at the ρ chosen on validation in the "
        "tuned study, scored on 2,002 words, level with AdamW after 4-bit)",
        tuple(FIRST_STUDY),
        "smollm",
        0.0,
        "msam",
        metric="int4",
        reading="accuracy after 4-bit quantisation",
    ),
    Row(
        "Clean labels, language-model fine-tuning (SmolLM2 + LoRA, few-shot word sentiment, 64 words per label)",
        "AdamW (no ρ from 0.001 to 3 helped, nor any variant); measure SAM on your task with `hf-sam compare`",
        tuple(TUNED_STUDY),
        "fewshot_smollm",
        0.0,
        "sam",
        reading="accuracy of SAM at ρ {rho}, the best on validation",
        phase="test",
    ),
    Row(
        "Do not: LookSAM on a fully fine-tuned language model at its default α (no ρ from 0.01 to 0.1 made it learn)",
        "—",
        tuple(FIRST_STUDY),
        "minilm",
        0.4,
        "looksam",
        reading="accuracy (MiniLM, 40% wrong labels: it does not learn)",
    ),
]


def measure(row: Row, keep_seed: Callable[[int], bool] = lambda seed: True) -> tuple[dict, float, float]:
    """The paired difference of `row.metric` to AdamW, the step-time ratio and AdamW's own mean, by
    `bench_benefit.summarize`: the rows of docs/benefit.md's tables (over the seeds `keep_seed` keeps)."""
    runs = [r for r in row.runs() if r["method"] in (row.method, "adamw") and keep_seed(r["seed"])]
    summary = {s["method"]: s for s in bench_benefit.summarize(runs)}
    if row.method not in summary or "adamw" not in summary:
        where = f"{row.task} noise {row.noise} in {[str(p) for p in row.files]}"
        raise SystemExit(f"which_method: no {row.method} or adamw runs for {where}")
    mine = summary[row.method]
    return mine[row.metric]["diff"], mine["cost_x_adamw"], summary["adamw"][row.metric]["mean"]


def advice(row: Row) -> str:
    """The row's advice, with the numbers it quotes (`Row.fresh_from`) computed from the runs."""
    if row.fresh_from is None:
        return row.advice
    found, _, _ = measure(row, lambda seed: seed < row.fresh_from)
    fresh, _, _ = measure(row, lambda seed: seed >= row.fresh_from)
    return row.advice.format(
        found=f"{row.scale * found['mean']:{row.spec}}",
        fresh=stats.format_diff(fresh, row.scale, row.spec),
        n_fresh=fresh["n"],
    )


def adamw_step_spread() -> float:
    """The largest ratio of AdamW's slowest step to its fastest among its tuned-study runs of one setting on one
    machine: how rough a step-time ratio is."""
    steps: dict[tuple, list[float]] = {}
    for r in all_runs(TUNED_STUDY[0]):
        if r["method"] == "adamw":
            steps.setdefault((r["task"], r["noise"], r["cpu"]), []).append(r["step_cpu_s"])
    return max(max(v) / min(v) for v in steps.values())


def render() -> str:
    header = ["Situation", "Try", "Measured against AdamW (95% interval; accuracy in points)", "Step time"]
    cells = []
    for row in ROWS:
        diff, cost, base = measure(row)
        source = "tuned study" if row.phase else "first study"
        rho = ", ".join(sorted({f"{r['rho']:g}" for r in row.runs() if r["method"] == row.method and r.get("rho")}))
        reading = row.reading.format(base=f"{row.scale * base:{row.spec}}", rho=rho)
        measured = f"{stats.format_diff(diff, row.scale, row.spec)} {reading}, {diff['n']} seeds ({source})"
        cells.append([row.situation, advice(row), measured, "—" if math.isnan(cost) else f"{cost:.2f}×"])
    lines = stats.markdown_table(header, cells)
    note = (
        "Computed by `python benchmarks/which_method.py` from docs/benefit/*.json (details, commands and every "
        "other method in [docs/benefit.md](docs/benefit.md)); step time is CPU time per step against AdamW's "
        f"on the same machine, paired by seed: rough, as AdamW's own step varied up to {adamw_step_spread():.1f}× "
        "between runs of one setting on one machine of the shared 2 cores ([step times](docs/benefit.md#step-times))."
    )
    return "\n".join([START, *lines, "", note, END])


def block(text: str, start_marker: str, end_marker: str, path: Path) -> tuple[int, int]:
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise SystemExit(f"which_method: {path} has no {start_marker} ... {end_marker} block")
    return start, end + len(end_marker)


def updated() -> dict[Path, str]:
    """README.md with the computed table, and docs/index.md with README's first screen (links relative to docs/)."""
    readme = README.read_text()
    start, end = block(readme, START, END, README)
    readme = readme[:start] + render() + readme[end:]
    start, end = block(readme, SCREEN_START, SCREEN_END, README)
    screen = readme[start:end].replace("](docs/", "](")
    index = INDEX.read_text()
    start, end = block(index, SCREEN_START, SCREEN_END, INDEX)
    return {README: readme, INDEX: index[:start] + screen + index[end:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a file differs from what this writes")
    args = parser.parse_args(argv)
    stale = {path: text for path, text in updated().items() if path.read_text() != text}
    if args.check:
        if stale:
            print("stale first screen in " + ", ".join(str(p.relative_to(ROOT)) for p in stale), file=sys.stderr)
            print("run: python benchmarks/which_method.py", file=sys.stderr)
            return 1
        return 0
    for path, text in stale.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
