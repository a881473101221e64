"""SAM in LLaMA-Factory: a launcher that runs LLaMA-Factory's own training workflow with SAM.

LLaMA-Factory lets a third party in through `callbacks` only, and a callback never sees the trainer. So this launcher
takes the place of `llamafactory-cli train`:

    python -m hf_sam.integrations.llamafactory config.yaml [key=value ...]

It reads the same YAML (or JSON) with LLaMA-Factory's `key=value` overrides, removes the `sam_*` keys (LLaMA-Factory's
parser would refuse them), and runs `llamafactory.train.tuner.run_exp` while the name through which the stage's
workflow constructs its trainer (`CustomSeq2SeqTrainer` for `stage: sft`, ...) refers to a function that builds that
class unchanged and then calls `enable_sam` on it. Nothing else in LLaMA-Factory is touched.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..config import SAMConfig
from ..trainer import enable_sam
from . import SAM_KEYS, sam_config_from_keys

logger = logging.get_logger(__name__)

SOURCE = "the LLaMA-Factory config"
# Per stage, the module whose global name the workflow constructs its trainer through, and that name (LLaMA-Factory
# 0.9.5: `run_dpo` imports its class inside the function, so it is looked up in the trainer module at call time).
STAGE_TRAINERS = {
    "pt": ("llamafactory.train.pt.workflow", "CustomTrainer"),
    "sft": ("llamafactory.train.sft.workflow", "CustomSeq2SeqTrainer"),
    "rm": ("llamafactory.train.rm.workflow", "PairwiseTrainer"),
    "dpo": ("llamafactory.train.dpo.trainer", "CustomDPOTrainer"),
    "kto": ("llamafactory.train.kto.workflow", "CustomKTOTrainer"),
}
# Options that train through another code path, where the patched classes are never built.
OTHER_PATHS = ("use_ray", "use_mca", "use_hyper_parallel")
USAGE = "usage: python -m hf_sam.integrations.llamafactory CONFIG.yaml|CONFIG.json [key=value ...]"


@contextmanager
def sam_trainers(stage: str, sam_config: SAMConfig) -> Iterator[list[Any]]:
    """Within the block, the workflow of `stage` builds its trainer as usual and `enable_sam` then converts it.

    Yields:
        The list of trainers converted so far (empty if LLaMA-Factory built none through the patched name).
    """
    module_name, name = STAGE_TRAINERS[stage]
    module = importlib.import_module(module_name)
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        raise RuntimeError(
            f"`{module_name}` has no class `{name}`: this LLaMA-Factory version builds its trainer differently from "
            "0.9.5, which this launcher was written for."
        )
    built: list[Any] = []

    def build(*args: Any, **kwargs: Any) -> Any:
        trainer = enable_sam(cls(*args, **kwargs), sam_config)
        logger.info(f"SAM enabled on LLaMA-Factory's {name}: {sam_config}")
        built.append(trainer)
        return trainer

    setattr(module, name, build)
    try:
        yield built
    finally:
        setattr(module, name, cls)


def run_exp(args: dict[str, Any], callbacks: list[Any] | None = None) -> None:
    """LLaMA-Factory's `run_exp` with SAM set by the `sam_*` keys of `args`.

    Args:
        args (`dict`): A LLaMA-Factory training config, plus any `sam_*` settings of `SAMTrainingArguments`.
        callbacks (`list`, *optional*): Passed to LLaMA-Factory.

    Raises:
        `ValueError`: for an invalid `sam_*` setting (naming the field and its valid values), a stage SAM does not
            run (`ppo` generates inside the step), or an option that trains through another code path.
        `RuntimeError`: when LLaMA-Factory trained without building a trainer through the patched classes.
    """
    args = dict(args)
    sam_config = sam_config_from_keys(args, SOURCE)
    for key in SAM_KEYS:
        args.pop(key, None)
    stage = args.get("stage", "sft")
    if stage not in STAGE_TRAINERS:
        raise ValueError(
            f"`stage: {stage}` in {SOURCE}: SAM runs with the stages {', '.join(STAGE_TRAINERS)} (`ppo` generates "
            "completions inside the training step)."
        )
    for option in OTHER_PATHS:
        if args.get(option):
            raise ValueError(
                f"`{option}` in {SOURCE}: trains through a code path this launcher does not reach; remove it or set "
                "it to false."
            )
    from llamafactory.train.tuner import run_exp as llamafactory_run_exp

    with sam_trainers(stage, sam_config) as built:
        llamafactory_run_exp(args, callbacks)
    if not built:
        raise RuntimeError("LLaMA-Factory trained without building a trainer this launcher could reach: no SAM.")


def read_config(argv: Sequence[str]) -> dict[str, Any]:
    """The config file named by `argv[0]` with the `key=value` overrides that follow, as `llamafactory-cli` reads
    them (OmegaConf)."""
    from omegaconf import OmegaConf

    path = Path(argv[0])
    config = OmegaConf.create(json.loads(path.read_text())) if path.suffix == ".json" else OmegaConf.load(path)
    return OmegaConf.to_container(OmegaConf.merge(config, OmegaConf.from_cli(list(argv[1:]))))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__)
        return
    if Path(argv[0]).suffix not in (".yaml", ".yml", ".json"):
        raise SystemExit(f"{USAGE}\nThe first argument must be a .yaml, .yml or .json config, got {argv[0]!r}.")
    run_exp(read_config(argv))


if __name__ == "__main__":
    main()
