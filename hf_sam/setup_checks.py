"""Setups SAM refuses before any weight changes: trainers that generate inside `training_step`, optimizers that step
inside `backward`. (Distributed setups: `distributed.py`; a variant's own refusals: its module.)"""

from __future__ import annotations

from typing import Any

from transformers.training_args import OptimizerNames

from .config import SAMConfig

__all__ = ["check_before_setup", "fused_backward_optimizer_reason", "generating_trainer_reason"]

# Optimizers that update the weights inside `backward`: SAM's second pass would step at the perturbed weights.
_FUSED_BACKWARD_OPTIMIZERS = {OptimizerNames.LOMO, OptimizerNames.ADALOMO}


def fused_backward_optimizer_reason(optim: Any) -> str | None:
    """Why SAM refuses this `optim` (it updates the weights inside `backward`), or `None`."""
    if optim not in _FUSED_BACKWARD_OPTIMIZERS:
        return None
    return (
        f"`optim={getattr(optim, 'value', optim)!r}` updates the weights inside `backward`, so SAM's second pass "
        "would step at the perturbed weights. Use an optimizer that steps after `backward`, e.g. `adamw_torch`, "
        "`sgd` or `adafactor`."
    )


# Trainers whose `training_step` generates completions and scores them (TRL's online methods and on-policy
# distillation): the perturbed pass would generate anew and call the reward functions again, training on a different
# batch. Caught by name (TRL's XPO, Nash-MD and PPO, which TRL 1.16 no longer ships), or by defining a method whose
# name starts with one of `_GENERATING_METHODS`: `_generate`, `_generate_and_score_completions` (GRPO, RLOO,
# distillation), `_generate_student_completions` (IW-OPD), `generate_on_policy_outputs` (GKD, GOLD), ...
_GENERATING_TRAINERS = {
    "GRPOTrainer",
    "RLOOTrainer",
    "OnlineDPOTrainer",
    "XPOTrainer",
    "NashMDTrainer",
    "PPOTrainer",
    "GKDTrainer",
}
_GENERATING_METHODS = ("_generate", "generate_on_policy_outputs")


def generating_trainer_reason(cls: type) -> str | None:
    """Why SAM refuses this Trainer class (it generates inside `training_step`), or `None`."""
    for base in cls.__mro__:
        generates = base.__name__ in _GENERATING_TRAINERS or any(m.startswith(_GENERATING_METHODS) for m in vars(base))
        if generates and base.__module__.split(".")[0] != "hf_sam":
            return (
                f"SAM does not support `{cls.__name__}`: it generates completions inside `training_step` (through "
                f"`{base.__name__}`), so SAM's perturbed pass would generate and score new completions and train on a "
                "different batch. Supported: trainers whose `training_step` is one forward-backward on the given "
                "batch: `Trainer`, `Seq2SeqTrainer` and TRL's SFT, DPO, Reward, KTO and ORPO trainers."
            )
    return None


def check_before_setup(cls: type, sam_config: Any) -> None:
    """What can be refused before a SAM trainer is set up: the type of `sam_config`, a generating trainer class."""
    if sam_config is not None and not isinstance(sam_config, SAMConfig):
        raise TypeError(f"`sam_config` must be a `SAMConfig`, got {type(sam_config).__name__}.")
    refusal = generating_trainer_reason(cls)
    if refusal is not None:
        raise ValueError(refusal)
