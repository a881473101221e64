"""The `hf-sam` command: compare the sharpness of checkpoints, plot their loss landscapes, compare methods.

    hf-sam sharpness MODEL [MODEL ...] --data eval.jsonl [--rho 0.05] [--hessian] [--trace]
    hf-sam landscape MODEL [MODEL ...] --data eval.jsonl --out landscape.png [--dims 2] [--interpolate]
    hf-sam compare [--methods adamw sam ...] [--seeds 0 1 2] [--metric NAME ...] -- python train.py ARGS ...

`compare` trains: it runs the command after `--` once per (method, seed) and compares the metrics against AdamW
(`hf_sam/compare/runner.py`, docs/compare.md). The rest of this module is about `sharpness` and `landscape`.

A MODEL is a local checkpoint directory (`save_pretrained` / Trainer checkpoint) or a PEFT adapter directory (its
base model is loaded from the adapter config's `base_model_name_or_path`). Data is a local .jsonl, .json or .csv
file with a text field (`--text-field`, default `text`) or prompt/completion fields (the loss then counts the
completion tokens only); for a sequence-classification model, a text field and an integer or named label
(`--label-field`). Each model's own tokenizer tokenizes the data (or `--tokenizer`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["build_parser", "load_examples", "load_model", "main", "tokenize_examples"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(Exception):
    """A user error: printed without a traceback, exit status 2."""


# ---- data ----------------------------------------------------------------------------------------------------------
def load_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a local .jsonl, .json (a list of objects, or an object with a list under `data`) or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--data: no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    elif suffix == ".json":
        with path.open(encoding="utf-8") as f:
            loaded = json.load(f)
        records = loaded.get("data") if isinstance(loaded, dict) else loaded
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            records = list(csv.DictReader(f))
    else:
        raise CLIError(f"--data: unsupported file type {suffix!r}; use .jsonl, .json or .csv.")
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise CLIError(f"--data: {path} holds no records (expected a list of objects with text fields).")
    return records


def tokenize_examples(
    records: list[dict[str, Any]],
    tokenizer: Any,
    *,
    task: str,
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    label_field: str = "label",
    label2id: dict[str, int] | None = None,
    max_length: int = 256,
    batch_size: int = 8,
    chat_template: bool = False,
    system_prompt: str | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize records into padded, model-ready batches with `labels` (in file order).

    Args:
        records (`list[dict[str, Any]]`): The examples.
        tokenizer (`Any`): A Hugging Face tokenizer.
        task (`str`): `"causal-lm"` (labels are the tokens; prompt tokens masked with -100) or `"classification"`.
        text_field (`str`, defaults to `"text"`): Field with the text.
        prompt_field (`str`, defaults to `"prompt"`): Prompt field (causal LM without a text field).
        completion_field (`str`, defaults to `"completion"`): Completion field.
        label_field (`str`, defaults to `"label"`): Class label field (classification).
        label2id (`dict[str, int]`, *optional*): Maps named labels to ids (classification).
        max_length (`int`, defaults to `256`): Truncation length in tokens.
        batch_size (`int`, defaults to `8`): Examples per batch.
        chat_template (`bool`, defaults to `False`): Prompt/completion records go through the tokenizer's chat
            template (user turn, then assistant turn), as TRL's `SFTTrainer` trains on conversational data.
        system_prompt (`str`, *optional*): A system turn before the prompt (with `chat_template`).

    Returns:
        `list[dict[str, torch.Tensor]]`: batches with `input_ids`, `attention_mask` and `labels`.
    """
    keys = set(records[0])
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    examples: list[tuple[list[int], Any]] = []
    for record in records:
        if task == "classification":
            if text_field not in record or label_field not in record:
                raise CLIError(
                    f"--data: a classification model needs fields {text_field!r} and {label_field!r} "
                    f"(--text-field/--label-field); the records have {sorted(keys)}."
                )
            ids = tokenizer(str(record[text_field]), truncation=True, max_length=max_length)["input_ids"]
            label = record[label_field]
            if isinstance(label, str) and not label.lstrip("-").isdigit():
                if not label2id or label not in label2id:
                    raise CLIError(f"--data: label {label!r} is not in the model's label2id {label2id}.")
                label = label2id[label]
            examples.append((ids, int(label)))
        elif text_field in record:
            ids = tokenizer(str(record[text_field]), truncation=True, max_length=max_length)["input_ids"]
            if len(ids) >= 2:
                examples.append((ids, list(ids)))
        elif prompt_field in record and completion_field in record:
            if chat_template:
                prompt, completion = _chat_ids(
                    tokenizer, str(record[prompt_field]), str(record[completion_field]), system_prompt
                )
            else:
                prompt = tokenizer(str(record[prompt_field]))["input_ids"]
                completion = tokenizer(str(record[completion_field]), add_special_tokens=False)["input_ids"]
            ids = (prompt + completion)[:max_length]
            labels = ([-100] * len(prompt) + completion)[:max_length]
            if any(t != -100 for t in labels[1:]):
                examples.append((ids, labels))
        else:
            raise CLIError(
                f"--data: each record needs a {text_field!r} field, or {prompt_field!r} and {completion_field!r} "
                f"(--text-field, --prompt-field, --completion-field); the records have {sorted(keys)}."
            )
    if not examples:
        raise CLIError("--data: no usable example (each needs at least two tokens, or a non-empty completion).")
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, _) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        if task == "classification":
            labels = torch.tensor([label for _, label in chunk], dtype=torch.long)
        else:
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (_, lab) in enumerate(chunk):
                labels[row, : len(lab)] = torch.tensor(lab)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


def _chat_ids(tokenizer: Any, prompt: str, completion: str, system_prompt: str | None) -> tuple[list[int], list[int]]:
    """Token ids of the templated prompt (with the generation prompt) and of the assistant turn that follows it."""
    if not getattr(tokenizer, "chat_template", None):
        raise CLIError("--chat-template: this model's tokenizer has no chat template.")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})

    def ids(conversation: list[dict[str, str]], **kwargs: Any) -> list[int]:
        out = tokenizer.apply_chat_template(conversation, tokenize=True, **kwargs)
        out = out["input_ids"] if isinstance(out, Mapping) else out
        return list(out[0] if out and isinstance(out[0], list) else out)

    head = ids(messages, add_generation_prompt=True)
    full = ids([*messages, {"role": "assistant", "content": completion}])
    if full[: len(head)] != head:
        raise CLIError("--chat-template: the template does not extend the prompt into the answer; use plain text.")
    return head, full[len(head) :]


# ---- models --------------------------------------------------------------------------------------------------------
def _task_of(architectures: Sequence[str] | None, peft_task: str | None = None) -> str:
    if peft_task == "SEQ_CLS" or any(a.endswith("ForSequenceClassification") for a in architectures or ()):
        return "classification"
    return "causal-lm"


def load_model(path: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Any, str, str]:
    """Load a checkpoint or PEFT adapter directory.

    Returns:
        `tuple[Any, str, str]`: the model, its task (`"causal-lm"` or `"classification"`) and the directory to look
        for a tokenizer in when `path` has none (the base model's, for an adapter).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    autos = {"causal-lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification}
    if not Path(path).exists():
        raise CLIError(f"MODEL {path!r}: no such directory (hf-sam reads local checkpoints and adapter directories).")
    if (Path(path) / "adapter_config.json").is_file():
        try:
            from peft import PeftConfig, PeftModel
        except ImportError as err:
            raise CLIError(f"MODEL {path!r} is a PEFT adapter: install `peft`.") from err
        peft_config = PeftConfig.from_pretrained(path)
        base_path = peft_config.base_model_name_or_path
        task_type = getattr(peft_config.task_type, "value", peft_config.task_type)
        task = _task_of(AutoConfig.from_pretrained(base_path).architectures, task_type)
        base = autos[task].from_pretrained(base_path, dtype=dtype)
        model = PeftModel.from_pretrained(base, path, is_trainable=True)  # adapters trainable: the adapter space
        return model.to(device), task, base_path
    task = _task_of(AutoConfig.from_pretrained(path).architectures)
    return autos[task].from_pretrained(path, dtype=dtype).to(device), task, path


def _load_tokenizer(path: str, fallback: str, override: str | None) -> Any:
    from transformers import AutoTokenizer

    for candidate in [override] if override else [path, fallback]:
        try:
            return AutoTokenizer.from_pretrained(candidate)
        except (OSError, ValueError, TypeError) as err:
            last = err
    raise CLIError(f"MODEL {path!r}: no tokenizer found ({last}); pass --tokenizer DIR.")


def _labels(paths: Sequence[str], given: Sequence[str] | None) -> list[str]:
    if given:
        if len(given) != len(paths):
            raise CLIError(f"--labels: {len(given)} labels for {len(paths)} models.")
        return list(given)
    names = [Path(p).resolve().name or p for p in paths]
    if len(set(names)) < len(names):  # checkpoint-500 under two runs: keep the parent
        names = [str(Path(*Path(p).resolve().parts[-2:])) for p in paths]
    return names


def _prepare(path: str, args: argparse.Namespace) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    model, task, fallback = load_model(path, dtype=_DTYPES[args.dtype], device=args.device)
    tokenizer = _load_tokenizer(path, fallback, args.tokenizer)
    label2id = getattr(getattr(model, "config", None), "label2id", None)
    batches = tokenize_examples(
        args.records,
        tokenizer,
        task=task,
        text_field=args.text_field,
        prompt_field=args.prompt_field,
        completion_field=args.completion_field,
        label_field=args.label_field,
        label2id=label2id,
        max_length=args.max_length,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
        system_prompt=args.system_prompt,
    )
    if args.max_batches is not None:
        batches = batches[: args.max_batches]
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # classification heads pool at the last non-pad token
    return model, batches


# ---- commands ------------------------------------------------------------------------------------------------------
def _merged(model: Any) -> Any:
    """A PEFT model as a plain one with the merged weights W + BA (other models as they are)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    return "\n".join([fmt[0], line, *fmt[1:]])


def _sharpness(args: argparse.Namespace) -> int:
    from .analysis import hessian_eigenvalues, hessian_trace, sam_sharpness

    labels = _labels(args.models, args.labels)
    progress = not args.no_progress
    results = []
    for path, label in zip(args.models, labels):
        model, batches = _prepare(path, args)
        common = dict(space=args.space, progress=progress)
        s = sam_sharpness(
            model, batches, rho=args.rho, adaptive=args.adaptive, eta=args.eta, steps=args.steps, m=args.m, **common
        )
        row: dict[str, Any] = {
            "model": label,
            "path": path,
            "loss": s.loss,
            "sharpness": s.sharpness,
            "perturbed_loss": s.perturbed_loss,
        }
        if args.hessian:
            eig = hessian_eigenvalues(model, batches, k=args.top_k, max_iter=args.max_iter, seed=args.seed, **common)
            row["hessian_eigenvalues"] = eig.eigenvalues
            row["hessian_converged"] = eig.converged
        if args.trace:
            tr = hessian_trace(model, batches, samples=args.trace_samples, seed=args.seed, **common)
            row["hessian_trace"], row["hessian_trace_std_error"] = tr.trace, tr.std_error
        results.append(row)
        del model
    ball = f"{'adaptive ' if args.adaptive else ''}rho={args.rho}, {args.steps} ascent step{'s' * (args.steps > 1)}"
    header = ["model", "loss", f"sharpness ({ball})", "perturbed loss"]
    if args.hessian:
        header += ["λ_max" if args.top_k == 1 else f"top-{args.top_k} eigenvalues"]
    if args.trace:
        header += [f"trace (±s.e., {args.trace_samples} samples)"]
    rows = []
    for r in results:
        cells = [r["model"], f"{r['loss']:.4f}", f"{r['sharpness']:.5f}", f"{r['perturbed_loss']:.4f}"]
        if args.hessian:
            values = zip(r["hessian_eigenvalues"], r["hessian_converged"])
            cells.append(", ".join(f"{v:.4g}{'' if ok else '*'}" for v, ok in values))
        if args.trace:
            se = r["hessian_trace_std_error"]
            cells.append(f"{r['hessian_trace']:.4g} ± {se:.2g}" if math.isfinite(se) else f"{r['hessian_trace']:.4g}")
        rows.append(cells)
    print(f"Sharpness on {args.data} ({args.space} parameters)")
    print(_format_table(header, rows))
    if args.hessian and not all(all(r["hessian_converged"]) for r in results):
        print(
            f"* power iteration did not settle in {args.max_iter} iterations (raise --max-iter; it is slow when two "
            "eigenvalues have nearly the same magnitude)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _landscape(args: argparse.Namespace) -> int:
    from .analysis import interpolate, plot_landscapes, random_landscape

    labels = _labels(args.models, args.labels)
    progress = not args.no_progress
    steps = args.steps or (21 if args.dims == 1 or args.interpolate else 11)
    landscapes = []
    if args.interpolate:
        if len(args.models) < 2:
            raise CLIError("--interpolate needs at least two MODELs: the line runs from the first to each other one.")
        if args.dims != 1:
            raise CLIError("--interpolate draws a 1-D line; drop --dims 2.")
        # The full space of a LoRA model moves base weights and keeps its own adapters, and a plain checkpoint has
        # no adapter names: both need the merged weights W + BA, which is what the full space means.
        adapters = [(Path(p) / "adapter_config.json").is_file() for p in args.models]
        merge = any(adapters) and (args.space == "full" or not all(adapters))
        space = "full" if merge else args.space
        if merge and args.space != "full":
            print("Adapter and plain checkpoints: interpolating the merged weights W + BA (--space full).")
        first, batches = _prepare(args.models[0], args)
        first = _merged(first) if merge else first
        for path, label in zip(args.models[1:], labels[1:]):
            other, _ = _prepare(path, args)
            other = _merged(other) if merge else other
            span = (-args.span_beyond, 1.0 + args.span_beyond)
            ls = interpolate(
                first,
                other,
                batches,
                span=span,
                steps=steps,
                space=space,
                progress=progress,
                label=f"{labels[0]} → {label}",
            )
            landscapes.append(ls)
            del other
        subtitle = f"data: {Path(args.data).name}, {'merged weights' if merge else f'{space} parameters'}"
    else:
        for path, label in zip(args.models, labels):
            model, batches = _prepare(path, args)
            landscapes.append(
                random_landscape(
                    model,
                    batches,
                    dims=args.dims,
                    span=args.span,
                    steps=steps,
                    seed=args.seed,
                    normalization=args.normalization,
                    ignore_1d=not args.keep_1d,
                    space=args.space,
                    progress=progress,
                    label=label,
                )
            )
            del model
        subtitle = (
            f"data: {Path(args.data).name}, {args.space} parameters, {args.normalization} normalisation, "
            f"seed {args.seed}"
        )
    out = plot_landscapes(landscapes, args.out, title=args.title, subtitle=subtitle, relative=args.relative)
    for ls in landscapes:
        flat = ls.losses.reshape(-1)
        low, high = int(flat.argmin()), int(flat.argmax())
        lowest = f"min {float(flat[low]):.4f} at {_point(ls, low)}"
        print(f"{ls.label}: loss {lowest}, max {float(flat[high]):.4f} at {_point(ls, high)}")
    print(f"Wrote {out}")
    return 0


def _point(ls: Any, index: int) -> str:
    if ls.y is None:
        return f"α={float(ls.x[index]):.3g}"
    return f"(α, β)=({float(ls.x[index // len(ls.y)]):.3g}, {float(ls.y[index % len(ls.y)]):.3g})"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `hf-sam`."""
    parser = argparse.ArgumentParser(
        prog="hf-sam",
        description="Measure and compare the sharpness of Hugging Face checkpoints; compare SAM with AdamW on a task.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("models", nargs="+", metavar="MODEL", help="checkpoint or PEFT adapter directories")
        p.add_argument("--data", required=True, help="local .jsonl, .json or .csv file")
        p.add_argument("--text-field", default="text")
        p.add_argument("--prompt-field", default="prompt")
        p.add_argument("--completion-field", default="completion")
        p.add_argument("--label-field", default="label", help="class label (sequence-classification models)")
        p.add_argument("--chat-template", action="store_true", help="prompt/completion data as chat turns")
        p.add_argument("--system-prompt", help="with --chat-template: a system turn before each prompt")
        p.add_argument("--tokenizer", help="tokenizer directory (default: each model's own)")
        p.add_argument("--max-length", type=int, default=256, help="tokens per example (default 256)")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-batches", type=int, default=None, help="measure on the first N batches only")
        p.add_argument(
            "--space",
            choices=("trainable", "full"),
            default="trainable",
            help="trainable parameters (the adapters of a PEFT model) or all weights (default trainable)",
        )
        p.add_argument("--labels", nargs="+", help="names for the models in the table/plot")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    s = sub.add_parser("sharpness", help="print a table of SAM sharpness (and Hessian measures) per model")
    common(s)
    s.add_argument("--rho", type=float, default=0.05)
    s.add_argument("--adaptive", action="store_true", help="ASAM's adaptive ball")
    s.add_argument("--eta", type=float, default=0.01)
    s.add_argument("--steps", type=int, default=1, help="ascent steps (default 1: SAM's own perturbation)")
    s.add_argument("--m", type=int, default=None, help="m-sharpness: one perturbation per m examples")
    s.add_argument("--hessian", action="store_true", help="also the Hessian's top eigenvalue(s)")
    s.add_argument("--top-k", type=int, default=1)
    s.add_argument("--max-iter", type=int, default=20, help="power iterations per eigenvalue")
    s.add_argument("--trace", action="store_true", help="also the Hessian trace (Hutchinson)")
    s.add_argument("--trace-samples", type=int, default=20)
    s.add_argument("--json", help="also write the results to this JSON file")
    s.set_defaults(func=_sharpness)

    ls = sub.add_parser("landscape", help="plot loss landscapes (PNG)")
    common(ls)
    ls.add_argument("--out", required=True, help="PNG path")
    ls.add_argument("--dims", type=int, choices=(1, 2), default=1)
    ls.add_argument("--span", type=float, default=1.0, help="random directions: coordinates in [-span, span]")
    ls.add_argument("--steps", type=int, default=None, help="points per axis (default 21 for 1-D, 11 for 2-D)")
    ls.add_argument("--interpolate", action="store_true", help="the line from the first MODEL to each other one")
    ls.add_argument(
        "--span-beyond", type=float, default=0.0, help="--interpolate: extend the line by this on both ends"
    )
    ls.add_argument("--normalization", choices=("filter", "layer"), default="filter")
    ls.add_argument("--keep-1d", action="store_true", help="perturb biases/norm weights too (direction = weight)")
    ls.add_argument("--relative", action="store_true", help="plot the rise above each model's own loss")
    ls.add_argument("--title")
    ls.set_defaults(func=_landscape)

    from .compare import runner  # the standard library and hf_sam.compare.stats only, until it runs

    c = sub.add_parser(
        "compare",
        help="train with each method and seed (the command after --) and compare the metrics against AdamW",
        usage="hf-sam compare [options] -- COMMAND [ARG ...]",
        description="Run the training command after `--` once per (method, seed), each in its own process and "
        "output folder, and compare each method's metrics with AdamW's: mean, sd, the difference paired by seed with "
        "its 95% t interval, time per step. Interrupted comparisons resume. See docs/compare.md.",
    )
    runner.add_arguments(c)
    c.set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hf-sam`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script = None
    if argv[:1] == ["compare"] and "--" in argv:  # the training command: everything after the first `--`
        cut = argv.index("--")
        argv, script = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        from .compare import runner

        return runner.main(args, script)
    for name in ("batch_size", "max_length", "max_batches", "steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer; got {value}.")
    bars_were_on = logging.is_progress_bar_enabled()
    if args.no_progress:
        logging.disable_progress_bar()  # transformers' own bars (weight loading) too
    try:
        args.records = load_examples(args.data)
        return args.func(args)
    except (CLIError, ValueError) as err:
        print(f"hf-sam {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if bars_were_on:
            logging.enable_progress_bar()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
