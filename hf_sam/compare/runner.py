"""`hf-sam compare`: run a training script once per (method, seed) and compare the methods against AdamW.

    hf-sam compare --seeds 0 1 2 --methods adamw sam 'sam:sam_rho=0.01' friendly -- \\
        python examples/sft_lora.py --output_dir runs/x --max_steps 100

Each run is the command after `--` in a process of its own, with its `--output_dir` set to
`<output_dir>/<method>/seed<k>`, `--seed <k>`, and the method's flags:

- `adamw`: `--baseline-flags` (default `--use_sam false`, the examples' switch to the plain Trainer);
- a `sam_method` name (`sam`, `friendly`, ...): `--sam-flags` (default `--use_sam true`) and `--sam_method <name>`;
- `name:key=value,key=value`: the same, and `--key value` for each `sam_*` field (`'sam:sam_rho=0.01'`).

A flag the command already has is replaced, not repeated. After each run, its metrics come from the first of
`all_results.json` (`trainer.save_metrics`), `eval_results.json` and `metrics.json` (the examples') in its output
folder, and its time per step from `train_runtime` / steps (see `time_per_step`). A run that exited 0 and wrote
metrics gets a record, `compare_run.json`, in its folder: a later invocation with the same command skips it. The
summary (mean, sd, the difference to AdamW paired by seed with its 95% t interval, time per step relative to AdamW)
uses `hf_sam.compare.stats`, the benefit benchmark's statistics (the t quantile is scipy's: checked before anything
runs), and goes to the screen, `compare.md` and `compare.json` (and `compare.png` with `--plot`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers.utils import logging

from . import stats

logger = logging.get_logger(__name__)

__all__ = [
    "METRIC_FILES",
    "CompareError",
    "Method",
    "add_arguments",
    "default_metrics",
    "main",
    "metrics_file",
    "parse_method",
    "parse_methods",
    "time_per_step",
]

BASELINE = "adamw"
METRIC_FILES = ("all_results.json", "eval_results.json", "metrics.json")  # read: the first that exists
TIME_FILES = ("train_results.json", "all_results.json")  # then the run's metrics file
RECORD = "compare_run.json"  # in a run's folder: its command, exit status and metrics file
# Trainer's speed, timing and memory metrics (eval_runtime, eval_samples_per_second, eval_model_preparation_time,
# eval_mem_cpu_alloc_delta, ...) and counts are not quality metrics: left out of the default set.
SPEED_SUFFIXES = ("_runtime", "_runtime_s", "_per_second", "_time")
NOT_METRICS = ("eval_samples", "eval_num_tokens")
TAIL_LINES = 40


class CompareError(Exception):
    """A comparison that cannot go on: printed without a traceback. `status` is the exit status."""

    status = 1


class UsageError(CompareError):
    """Arguments that name something that does not exist (found before anything runs): exit status 2."""

    status = 2


# ---- methods --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Method:
    """A method as given to `--methods`: `adamw`, a `sam_method` name, or `name:sam_key=value,...`."""

    label: str
    name: str
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def is_baseline(self) -> bool:
        return self.name == BASELINE

    @property
    def folder(self) -> str:
        """The label as a folder name (`sam:sam_rho=0.01` -> `sam-sam_rho=0.01`)."""
        return re.sub(r"[^A-Za-z0-9._=+-]+", "-", self.label).strip("-")


def sam_fields() -> list[str]:
    """The `sam_*` fields of `hf_sam.SAMArguments`."""
    from hf_sam import SAMArguments

    return [f.name for f in dataclasses.fields(SAMArguments)]


def method_names() -> list[str]:
    """`adamw`, then every registered `sam_method`."""
    from hf_sam.variants import VARIANTS

    return [BASELINE, *VARIANTS]


def _closest(word: str, choices: Sequence[str]) -> str:
    return difflib.get_close_matches(word, choices, n=1, cutoff=0.0)[0]


def parse_method(text: str) -> Method:
    """Parse one `--methods` entry; raise `UsageError` naming the closest valid name for an unknown one.

    The settings are checked as the training script's parser would (`HfArgumentParser(SAMArguments)`): a value of
    the wrong type or out of range is an error here, before anything runs.
    """
    label = text.strip()
    name, colon, rest = label.partition(":")
    names = method_names()
    if name not in names:
        raise UsageError(
            f"--methods {text!r}: no method {name!r}; did you mean {_closest(name, names)!r}? Methods: adamw (the "
            f"plain Trainer) and the sam_method values {', '.join(names[1:])}."
        )
    settings: list[tuple[str, str]] = []
    if colon:
        if name == BASELINE:
            raise UsageError(f"--methods {text!r}: adamw is the plain Trainer; it takes no sam_* settings.")
        fields = sam_fields()
        items = [item.strip() for item in rest.split(",")]
        if not rest.strip() or not all(items):
            raise UsageError(
                f"--methods {text!r}: write NAME:sam_key=value[,sam_key=value...], e.g. 'sam:sam_rho=0.01'."
            )
        for item in items:
            key, eq, value = (part.strip() for part in item.partition("="))
            if not eq or not key or not value:
                raise UsageError(f"--methods {text!r}: {item!r} is not key=value (e.g. 'sam:sam_rho=0.01').")
            if key == "sam_method":
                raise UsageError(
                    f"--methods {text!r}: name the method before the colon, e.g. 'friendly:sam_rho=0.01'."
                )
            if key not in fields:
                guess = _closest(key if key.startswith("sam_") else f"sam_{key}", fields)
                raise UsageError(
                    f"--methods {text!r}: {key!r} names no sam_* field of hf_sam.SAMArguments; did you mean {guess!r}?"
                )
            if key in dict(settings):
                raise UsageError(f"--methods {text!r}: {key} is given twice.")
            settings.append((key, value))
    method = Method(label, name, tuple(settings))
    if not method.is_baseline:
        _check_settings(method)
    return method


def _check_settings(method: Method) -> None:
    """Parse the method's flags with `HfArgumentParser(SAMArguments)`: types, choices and `SAMConfig`'s checks."""
    from transformers import HfArgumentParser

    from hf_sam import SAMArguments

    argv = ["--sam_method", method.name, *[token for k, v in method.settings for token in (f"--{k}", v)]]
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            HfArgumentParser(SAMArguments).parse_args_into_dataclasses(args=argv)
    except SystemExit:
        lines = captured.getvalue().strip().splitlines() or ["invalid value"]
        raise UsageError(f"--methods {method.label!r}: {lines[-1].split('error: ', 1)[-1]}") from None
    except ValueError as err:
        raise UsageError(f"--methods {method.label!r}: {err}") from None


def parse_methods(texts: Sequence[str]) -> list[Method]:
    """Parse `--methods`; AdamW, the baseline, is added first when missing."""
    methods = [parse_method(t) for t in texts]
    labels = [m.label for m in methods]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UsageError(f"--methods: {', '.join(repeated)} given more than once.")
    folders: dict[str, str] = {}
    for m in methods:
        if m.folder in folders:
            raise UsageError(f"--methods: {folders[m.folder]!r} and {m.label!r} would share the folder {m.folder!r}.")
        folders[m.folder] = m.label
    if not any(m.is_baseline for m in methods):
        methods.insert(0, Method(BASELINE, BASELINE))
    return methods


# ---- commands -------------------------------------------------------------------------------------------------------
def _spellings(name: str) -> tuple[str, ...]:
    """`--output_dir` and `--output-dir` (HfArgumentParser accepts both)."""
    name = name.lstrip("-")
    return tuple(dict.fromkeys((f"--{name}", f"--{name.replace('_', '-')}")))


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The last value given to `--name` (or `--name=value`) in `argv`, None if absent."""
    value = None
    for i, token in enumerate(argv):
        for flag in _spellings(name):
            if token == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif token.startswith(flag + "="):
                value = token[len(flag) + 1 :]
    return value


def without_flag(argv: Sequence[str], name: str) -> list[str]:
    """`argv` without `--name value`, `--name=value` or a bare `--name` (a boolean switch)."""
    flags = _spellings(name)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in flags:
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else 1
            continue
        if token.startswith(tuple(f + "=" for f in flags)):
            i += 1
            continue
        out.append(token)
        i += 1
    return out


def with_flag(argv: Sequence[str], name: str, value: str | None) -> list[str]:
    """`argv` with `--name value` (replacing any earlier `--name`), or the bare switch when `value` is None."""
    return [*without_flag(argv, name), f"--{name.lstrip('-')}", *([] if value is None else [value])]


def flag_pairs(text: str) -> list[tuple[str, str | None]]:
    """`"--use_sam false --foo"` -> `[("use_sam", "false"), ("foo", None)]`."""
    tokens = shlex.split(text)
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(tokens):
        if not tokens[i].startswith("--"):
            raise UsageError(f"flags {text!r}: expected --name [value] pairs, got {tokens[i]!r}.")
        name, eq, value = tokens[i][2:].partition("=")
        if eq:
            pairs.append((name, value))
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            pairs.append((name, tokens[i + 1]))
            i += 2
        else:
            pairs.append((name, None))
            i += 1
    return pairs


@dataclasses.dataclass
class Run:
    """One (method, seed): its folder, log file and command."""

    method: Method
    seed: int
    directory: Path
    log: Path
    command: list[str]

    @property
    def name(self) -> str:
        return f"{self.method.label} seed {self.seed}"


def plan_runs(
    script: Sequence[str],
    methods: Sequence[Method],
    seeds: Sequence[int],
    output_dir: Path,
    baseline_flags: str,
    sam_flags: str,
) -> list[Run]:
    """Every (method, seed) run, seed by seed (each seed's methods together: a partial comparison is paired)."""
    runs = []
    for seed in seeds:
        for method in methods:
            directory = output_dir / method.folder / f"seed{seed}"
            command = with_flag(script, "output_dir", str(directory))
            command = with_flag(command, "seed", str(seed))
            flags = flag_pairs(baseline_flags if method.is_baseline else sam_flags)
            if not method.is_baseline:
                flags += [("sam_method", method.name), *method.settings]
            for name, value in flags:
                command = with_flag(command, name, value)
            log = output_dir / "logs" / f"{method.folder}_seed{seed}.log"
            runs.append(Run(method, seed, directory, log, command))
    return runs


# ---- what a run wrote -----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metrics_file(directory: Path) -> Path | None:
    """The first of `METRIC_FILES` in `directory` that holds a JSON object."""
    for name in METRIC_FILES:
        if _read_json(directory / name) is not None:
            return directory / name
    return None


def default_metrics(values: dict[str, Any]) -> list[str]:
    """Every numeric `eval_*` metric but the Trainer's speed, timing and memory metrics (names ending in `_runtime`,
    `_per_second` or `_time`, or holding `_mem_`) and `eval_samples`, in the file's order with `eval_loss` last (the
    first is the primary metric)."""
    keys = [
        k
        for k, v in values.items()
        if k.startswith("eval_")
        and _number(v)
        and not k.endswith(SPEED_SUFFIXES)
        and "_mem_" not in k
        and k not in NOT_METRICS
    ]
    return [k for k in keys if k != "eval_loss"] + [k for k in keys if k == "eval_loss"]


def _newest_checkpoint_state(directory: Path) -> Path | None:
    found = []
    for path in directory.glob("checkpoint-*/trainer_state.json"):
        suffix = path.parent.name.split("-", 1)[1]
        if suffix.isdigit():
            found.append((int(suffix), path))
    return max(found)[1] if found else None


def time_per_step(directory: Path, metrics_path: Path | None) -> dict[str, Any]:
    """Seconds per optimizer step of a finished run, and where they came from.

    `train_runtime` (the Trainer's wall time of `train()`; `train_runtime_s` in sft_lora.py's `metrics.json`) from
    the first of `train_results.json`, `all_results.json` and the run's metrics file that has it, divided by the step
    count: `global_step` of `trainer_state.json` in the run's folder, else of its newest `checkpoint-*/`, else
    `max_steps` of the metrics file. Without a step count, 1 / `train_steps_per_second` (the Trainer rounds it to
    three decimals). None when the run wrote neither.
    """
    files = [directory / name for name in TIME_FILES]
    if metrics_path is not None and metrics_path not in files:
        files.append(metrics_path)
    loaded = [(path, _read_json(path) or {}) for path in files]
    runtime = next(
        (
            (path, key, d[key])
            for path, d in loaded
            for key in ("train_runtime", "train_runtime_s")
            if _number(d.get(key))
        ),
        None,
    )
    steps = None
    for state_path in (directory / "trainer_state.json", _newest_checkpoint_state(directory)):
        state = _read_json(state_path) if state_path is not None else None
        if state and _number(state.get("global_step")) and state["global_step"] > 0:
            steps = (f"global_step of {state_path.relative_to(directory)}", state["global_step"])
            break
    if steps is None and metrics_path is not None:
        max_steps = (_read_json(metrics_path) or {}).get("max_steps")
        if _number(max_steps) and max_steps > 0:
            steps = (f"max_steps of {metrics_path.name}", max_steps)
    if runtime is not None and steps is not None:
        path, key, value = runtime
        return {
            "seconds_per_step": value / steps[1],
            "steps": steps[1],
            "time_source": f"{key} of {path.name} / {steps[0]}",
        }
    rate = next(
        ((path, d["train_steps_per_second"]) for path, d in loaded if _number(d.get("train_steps_per_second"))), None
    )
    if rate is not None and rate[1] > 0:
        return {
            "seconds_per_step": 1.0 / rate[1],
            "steps": None,
            "time_source": f"1 / train_steps_per_second of {rate[0].name}",
        }
    return {"seconds_per_step": None, "steps": None, "time_source": None}


def finished_record(run: Run) -> dict | None:
    """The run's record if it exited 0 and its metrics file is still there (then it is not run again)."""
    record = _read_json(run.directory / RECORD)
    if not record or record.get("returncode") != 0:
        return None
    if not record.get("metrics_file") or not (run.directory / record["metrics_file"]).is_file():
        return None
    return record


def _status(run: Run) -> str:
    """What became of a run that did not finish."""
    record = _read_json(run.directory / RECORD)
    if record and record.get("returncode"):
        return f"exited with status {record['returncode']}, log {run.log}"
    if record and record.get("returncode") is None:
        return f"wrote no metrics, log {run.log}"
    if record:
        return f"its metrics file is gone, log {run.log}"
    return f"interrupted, log {run.log}" if run.log.exists() else "not run"


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.replace("\r", "\n").rstrip().splitlines()[-lines:])


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def execute(run: Run) -> dict:
    """Run one training command; its output goes to `run.log`. Returns its record, raises `CompareError` when it
    exits non-zero or writes no metrics (the log's tail in the message)."""
    run.directory.mkdir(parents=True, exist_ok=True)
    run.log.parent.mkdir(parents=True, exist_ok=True)
    # what an interrupted attempt left: never read as this attempt's results
    for name in (RECORD, *METRIC_FILES, *TIME_FILES, "trainer_state.json"):
        (run.directory / name).unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.time()
    with open(run.log, "w") as log:
        log.write(f"$ {shlex.join(run.command)}\n\n")
        log.flush()
        try:
            proc = subprocess.Popen(
                run.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        except OSError as err:
            raise CompareError(f"{run.name}: cannot start {run.command[0]!r}: {err}") from None
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    record: dict[str, Any] = {
        "method": run.method.label,
        "seed": run.seed,
        "command": run.command,
        "returncode": returncode,
        "wall_s": time.time() - started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "log": str(run.log),
    }
    if returncode != 0:
        _write_json(run.directory / RECORD, record)
        raise CompareError(f"{run.name} exited with status {returncode}. Last lines of {run.log}:\n{_tail(run.log)}")
    found = metrics_file(run.directory)
    if found is None:
        record["returncode"] = None  # exited 0 but is not finished: run again next time
        _write_json(run.directory / RECORD, record)
        raise CompareError(
            f"{run.name} exited 0 but wrote no metrics: looked for {', '.join(METRIC_FILES)} in {run.directory} "
            f"(the script must write them there: `trainer.save_metrics('all', metrics)`, or pass --output_dir on to "
            f"the Trainer). Last lines of {run.log}:\n{_tail(run.log)}"
        )
    record["metrics_file"] = found.name
    _write_json(run.directory / RECORD, record)
    return record


# ---- the command ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `hf-sam compare` (the training command follows `--`)."""
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["adamw", "sam"],
        metavar="METHOD",
        help="adamw (the plain Trainer), a sam_method name (sam, friendly, looksam, ...), or NAME:sam_key=value,... "
        "('sam:sam_rho=0.01'); adamw is added when missing (default: adamw sam)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="default: 0 1 2")
    parser.add_argument(
        "--metric",
        nargs="+",
        action="extend",
        default=None,
        metavar="NAME",
        help="metrics to compare, the first the primary one (default: every numeric eval_* metric but the speed "
        "metrics, eval_loss last)",
    )
    parser.add_argument(
        "--output-dir",
        help="where the runs, logs and compare.json/.md go (default: the command's --output_dir)",
    )
    parser.add_argument(
        "--baseline-flags",
        default="--use_sam false",
        help="flags of the adamw runs (default: '--use_sam false', the examples' switch to the plain Trainer)",
    )
    parser.add_argument(
        "--sam-flags", default="--use_sam true", help="flags of every SAM run (default: '--use_sam true')"
    )
    parser.add_argument("--plot", action="store_true", help="also compare.png: benefit against cost (matplotlib)")
    parser.add_argument(
        "--allow-incomplete", action="store_true", help="summarise the runs that finished when some did not"
    )
    parser.add_argument("--keep-going", action="store_true", help="after a failing run, go on with the others")
    parser.add_argument("--summary-only", action="store_true", help="run nothing: summarise the finished runs")
    parser.add_argument("--dry-run", action="store_true", help="print each run's command and exit")


def _gather(runs: Sequence[Run], wanted: Sequence[str] | None) -> tuple[list[str], list[dict]]:
    """The metrics to compare and one record per finished run (method, seed, the metrics, seconds per step)."""
    loaded = []
    for run in runs:
        path = run.directory / finished_record(run)["metrics_file"]
        loaded.append((run, path, _read_json(path) or {}))
    if wanted:
        metrics = list(dict.fromkeys(wanted))
    else:
        run, path, values = loaded[0]
        metrics = default_metrics(values)
        if not metrics:
            numeric = [k for k, v in values.items() if _number(v)]
            raise CompareError(
                f"{path} ({run.name}) holds no numeric eval_* metric; name the metrics with --metric (its numbers: "
                f"{', '.join(numeric) or 'none'})."
            )
    problems = []
    for metric in metrics:
        missing = [f"{run.name} ({path})" for run, path, values in loaded if not _number(values.get(metric))]
        if missing:
            problems.append(f"{metric!r} is missing (or not a number) in " + "; ".join(missing))
    if problems:
        available = sorted({k for _, _, values in loaded for k, v in values.items() if _number(v)})
        raise CompareError(
            "; ".join(problems)
            + f". Numeric metrics these runs wrote: {', '.join(available)}"
            + ("" if wanted else " (pick with --metric)")
            + "."
        )
    records = []
    for run, path, values in loaded:
        record = {"method": run.method.label, "seed": run.seed, **{m: float(values[m]) for m in metrics}}
        record.update(time_per_step(run.directory, path))
        record.update(output_dir=str(run.directory), metrics_file=str(path), log=str(run.log))
        records.append(record)
    return metrics, records


def format_table(rows: Sequence[dict], metrics: Sequence[str]) -> str:
    """The comparison as a markdown table: each metric's mean (sd) and paired Δ vs AdamW [95% CI], time per step."""
    header = ["method", "seeds"]
    for metric in metrics:
        header += [f"{metric} (sd)", f"Δ {metric} vs {BASELINE} [95% CI]"]
    header += ["s/step", f"× {BASELINE} step"]
    cells = []
    for row in rows:
        line = [row["method"], str(len(row["seeds"]))]
        for metric in metrics:
            m = row[metric]
            line += [
                f"{stats.format_value(m['mean'], 1, '.4g')} ({stats.format_value(m['sd'], 1, '.2g')})",
                stats.format_diff(m.get("diff"), 1, "+.3g"),
            ]
        line += [
            stats.format_value(row["seconds_per_step"], 1, ".3g"),
            stats.format_value(row[f"cost_x_{BASELINE}"], 1, ".2f"),
        ]
        cells.append(line)
    return "\n".join(stats.markdown_table(header, cells)) + "\n"


NOTES = (
    "Δ: the mean over seeds of (method − {baseline}) at the same seed, with the 95% interval of that mean from "
    "Student's t with n − 1 degrees of freedom (n: the seeds both ran; no interval with one seed). It is an interval "
    "for the mean difference over seeds of this setup (data, steps, hyper-parameters), not a guarantee for another "
    "task or for a single run. s/step: the Trainer's train_runtime / steps; × {baseline} step: the mean over seeds of "
    "the run's time per step over {baseline}'s at the same seed.\n"
)


def main(args: argparse.Namespace, script: Sequence[str] | None) -> int:
    """Run `hf-sam compare`; returns the exit status."""
    try:
        return _compare(args, list(script or []))
    except CompareError as err:
        print(f"hf-sam compare: error: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        print(
            "\nhf-sam compare: interrupted. Finished runs are kept: run the same command again to resume.",
            file=sys.stderr,
        )
        return 130


@dataclasses.dataclass
class Plan:
    """What one `hf-sam compare` does: the training command, the methods, the seeds, the output folder, the runs."""

    script: list[str]
    methods: list[Method]
    seeds: list[int]
    output_dir: Path
    runs: list[Run]


def _compare(args: argparse.Namespace, script: list[str]) -> int:
    """Check and plan the runs, train those not finished, then summarise the finished ones; returns the exit status."""
    plan = _check_and_plan(args, script)
    if args.dry_run:
        for run in plan.runs:
            print(shlex.join(run.command))
        return 0
    todo = _runs_to_train(plan)
    started = time.time()
    if not args.summary_only:
        _train(plan, todo, started, keep_going=args.keep_going)
    finished, unfinished = _finished_runs(plan, allow_incomplete=args.allow_incomplete)
    _summarise(plan, finished, unfinished, started, wanted=args.metric, plot=args.plot)
    return 0


def _check_and_plan(args: argparse.Namespace, script: list[str]) -> Plan:
    """Check the arguments and what the summary needs (scipy; matplotlib with --plot), then plan every run."""
    if not script:
        raise UsageError("give the training command after `--`: hf-sam compare [options] -- python train.py ...")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds: give distinct seeds, got {args.seeds}.")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: `pip install matplotlib` (or drop --plot).")
    try:
        stats.require_scipy()
    except ImportError as err:
        raise UsageError(str(err)) from None
    methods = parse_methods(args.methods)
    base = args.output_dir or flag_value(script, "output_dir")
    if not base:
        raise UsageError("no output folder: give --output_dir in the training command or --output-dir to compare.")
    output_dir = Path(base)
    runs = plan_runs(script, methods, args.seeds, output_dir, args.baseline_flags, args.sam_flags)
    return Plan(script, methods, list(args.seeds), output_dir, runs)


def _runs_to_train(plan: Plan) -> list[Run]:
    """The runs not finished earlier; a `UsageError` when a finished run ran another command."""
    done = {id(run): finished_record(run) for run in plan.runs}
    changed = [run for run in plan.runs if done[id(run)] and done[id(run)].get("command") != run.command]
    if changed:
        first = changed[0]
        raise UsageError(
            f"{len(changed)} finished run(s) in {plan.output_dir} ran another command, e.g. {first.name}:\n  "
            f"{shlex.join(done[id(first)]['command'])}\nnow:\n  {shlex.join(first.command)}\nUse another "
            f"--output_dir, or delete those runs' {RECORD} to train them again."
        )
    return [run for run in plan.runs if not done[id(run)]]


def _train(plan: Plan, todo: Sequence[Run], started: float, *, keep_going: bool) -> None:
    """Train the `todo` runs one after the other, printing progress; stop at the first failure unless `keep_going`."""
    runs = plan.runs
    print(
        f"hf-sam compare: {len(runs)} runs ({len(plan.methods)} methods x {len(plan.seeds)} seeds) in "
        f"{plan.output_dir}: {len(runs) - len(todo)} finished earlier, {len(todo)} to run.",
        flush=True,
    )
    for i, run in enumerate(todo, 1):
        print(
            f"[{i}/{len(todo)}] {run.name}: training ({_duration(time.time() - started)} elapsed, "
            f"{len(todo) - i} left after this; log {run.log})",
            flush=True,
        )
        t0 = time.time()
        try:
            execute(run)
        except CompareError as err:
            if not keep_going:
                finished = sum(1 for r in runs if finished_record(r))
                raise CompareError(
                    f"{err}\n{finished} of {len(runs)} runs have finished and are kept: fix the problem and run "
                    "the same command again to resume."
                ) from None
            print(f"hf-sam compare: {err}", file=sys.stderr, flush=True)
            continue
        print(f"    finished in {_duration(time.time() - t0)}", flush=True)


def _finished_runs(plan: Plan, *, allow_incomplete: bool) -> tuple[list[Run], list[Run]]:
    """The finished and the unfinished runs; a `CompareError` listing the unfinished ones unless the comparison
    may be incomplete (`--allow-incomplete`, and at least one run finished)."""
    finished, unfinished = [], []
    for run in plan.runs:  # each run's record read once
        (unfinished if finished_record(run) is None else finished).append(run)
    if unfinished:
        listing = "; ".join(f"{run.name} ({_status(run)})" for run in unfinished)
        if not allow_incomplete or not finished:
            raise CompareError(
                f"{len(unfinished)} of {len(plan.runs)} runs did not finish: {listing}. Run again to resume"
                + (", or pass --allow-incomplete to summarise the finished ones." if finished else ".")
            )
        logger.warning(f"Summarising the {len(finished)} finished runs; not finished: {listing}.")
    return finished, unfinished


def _summarise(
    plan: Plan,
    finished: Sequence[Run],
    unfinished: Sequence[Run],
    started: float,
    *,
    wanted: Sequence[str] | None,
    plot: bool,
) -> None:
    """Summarise the finished runs: the table and its notes on the screen, in compare.md and compare.json, and
    compare.png with `plot`."""
    metrics, records = _gather(finished, wanted)
    order = [m.label for m in plan.methods]
    rows = stats.summarize(records, metrics=metrics, baseline=BASELINE, cost_key="seconds_per_step", order=order)
    table = format_table(rows, metrics)
    notes = _notes(records, unfinished, len(plan.runs))
    print(f"\nPrimary metric: {metrics[0]}. Runs: {plan.output_dir}\n")
    print(table)
    print(notes)

    out = plan.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(
        f"# hf-sam compare\n\n```\n{shlex.join(plan.script)}\n```\n\nMethods: {', '.join(order)}; seeds: "
        f"{' '.join(map(str, plan.seeds))}; primary metric: {metrics[0]}.\n\n{table}\n{notes}"
    )
    info = _info(plan, metrics, unfinished, started)
    _write_json(out / "compare.json", {"info": info, "runs": records, "rows": rows})
    written = [out / "compare.md", out / "compare.json"]
    if plot:
        stats.plot_benefit_vs_cost(
            rows,
            out / "compare.png",
            metric=metrics[0],
            baseline=BASELINE,
            xlabel=f"time per step, × {BASELINE}",
            ylabel=f"{metrics[0]} − {BASELINE} (95% interval paired by seed)",
        )
        written.append(out / "compare.png")
    print(f"Wrote {', '.join(map(str, written))}")


def _notes(records: Sequence[dict], unfinished: Sequence[Run], total: int) -> str:
    """The notes under the table: how to read it, the runs without a time per step, whether runs are missing."""
    notes = NOTES.format(baseline=BASELINE)
    no_time = [f"{r['method']} seed {r['seed']}" for r in records if r["seconds_per_step"] is None]
    if no_time:
        notes += f"No time per step (no train_runtime in their files): {', '.join(no_time)}.\n"
    if unfinished:
        notes += f"Incomplete: {len(unfinished)} of {total} runs did not finish.\n"
    return notes


def _info(plan: Plan, metrics: Sequence[str], unfinished: Sequence[Run], started: float) -> dict[str, Any]:
    """compare.json's `info`: what was compared, whether every run finished, the version and the wall time."""
    import hf_sam

    return {
        "command": plan.script,
        "methods": [m.label for m in plan.methods],
        "seeds": plan.seeds,
        "metrics": list(metrics),
        "primary_metric": metrics[0],
        "output_dir": str(plan.output_dir),
        "complete": not unfinished,
        "unfinished": [{"method": run.method.label, "seed": run.seed} for run in unfinished],
        "hf_sam": hf_sam.__version__,
        "wall_s": time.time() - started,
    }
