"""SAM for TRL's trainers: `SAMSFTTrainer` with `SAMSFTConfig`, `SAMDPOTrainer` with `SAMDPOConfig`.

This module imports `trl`; `import hf_sam` does not, so TRL stays optional. Each trainer is `SAMMixin` in front of
TRL's trainer and nothing more: `class SAMKTOTrainer(SAMMixin, KTOTrainer)` is as right as these. TRL records its own
metrics (entropy, token accuracy, token count, DPO rewards) inside `compute_loss`, which SAM runs twice per
micro-batch; `SAMMixin` puts every plain-data attribute of the trainer back after the perturbed pass, so TRL's metrics
stay those of the clean pass, as in a run without SAM. The perturbed loss is reported in `sam_perturbed_loss`.

DPO is supported: the reference log-probabilities come from a separate reference model, from the policy with its
adapters disabled (PEFT), or from the dataset (`precompute_ref_log_probs`). SAM perturbs only the policy's trainable
parameters, so the reference is the same in both passes and the perturbed pass computes the DPO loss at w + e against
an unchanged reference, which is what SAM asks for.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import SAMArguments
from .trainer import SAMMixin

try:
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "`hf_sam.trl` needs TRL: `pip install trl` (or hf_sam's `examples` extra, `pip install '.[examples]'` from "
        "the repository). `import hf_sam` works without it."
    ) from error

__all__ = ["SAMDPOConfig", "SAMDPOTrainer", "SAMSFTConfig", "SAMSFTTrainer"]


@dataclass
class SAMSFTConfig(SAMArguments, SFTConfig):
    """TRL's `SFTConfig` with the SAM settings as `sam_*` fields (`--sam_rho 0.05`, `--sam_adaptive`, ...).

    Every `SFTConfig` field keeps its meaning; see `SAMConfig` for the SAM settings.
    """


@dataclass
class SAMDPOConfig(SAMArguments, DPOConfig):
    """TRL's `DPOConfig` with the SAM settings as `sam_*` fields (`--sam_rho 0.05`, `--sam_adaptive`, ...).

    Every `DPOConfig` field keeps its meaning; see `SAMConfig` for the SAM settings.
    """


class SAMSFTTrainer(SAMMixin, SFTTrainer):
    """TRL's `SFTTrainer` with SAM or ASAM.

    Takes `SFTTrainer`'s arguments plus `sam_config`; with `SAMSFTConfig` the `sam_*` fields configure SAM. The loss
    TRL builds (completion-only, assistant-only, DFT, ...) is the loss that both SAM passes minimise; with a PEFT
    model only the adapters are perturbed and trained.

    Example:
        ```python
        from hf_sam.trl import SAMSFTConfig, SAMSFTTrainer

        args = SAMSFTConfig(output_dir="out", sam_rho=0.05)
        trainer = SAMSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        ```
    """


class SAMDPOTrainer(SAMMixin, DPOTrainer):
    """TRL's `DPOTrainer` with SAM or ASAM.

    Takes `DPOTrainer`'s arguments plus `sam_config`; with `SAMDPOConfig` the `sam_*` fields configure SAM. Only the
    policy's trainable parameters are perturbed: the reference model (or the adapter-free base under PEFT, or the
    precomputed reference log-probabilities) is the same in both passes.

    Example:
        ```python
        from hf_sam.trl import SAMDPOConfig, SAMDPOTrainer

        args = SAMDPOConfig(output_dir="out", sam_rho=0.05, beta=0.1)
        trainer = SAMDPOTrainer(
            model=model, ref_model=ref_model, args=args, train_dataset=pairs, processing_class=tokenizer
        )
        trainer.train()
        ```
    """
