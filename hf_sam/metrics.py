"""The `sam_*` metrics: sums kept on the device per step, averaged over the logging window when the Trainer logs."""

from __future__ import annotations

import torch

__all__ = ["SAMMetrics"]


class SAMMetrics:
    """Sums of the per-step SAM metrics, kept on the device and read back only when the Trainer logs."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.clean_loss: torch.Tensor | float = 0.0
        self.perturbed_loss: torch.Tensor | float = 0.0
        self.grad_norm: torch.Tensor | float = 0.0
        self.skipped: torch.Tensor | float = 0.0
        self.steps = 0  # optimizer steps with a perturbed pass since the last log
        self.counted: torch.Tensor | float = 0.0  # of those, the steps in the loss sums (all, or the finite ones)
        self.step_clean: torch.Tensor | float = 0.0  # the current step's losses, until `end_step`
        self.step_perturbed: torch.Tensor | float = 0.0
        self.perturbations = 0  # one per step ("exact") or per micro-batch ("micro")
        self.rho_sum = 0.0
        self.rho_steps = 0

    def end_step(self, nan_inf_filter: bool) -> None:
        """Move the step's losses into the window sums; with the Trainer's `logging_nan_inf_filter`, a step whose
        clean or perturbed loss is not finite is left out of them (on the device: no host sync)."""
        clean, perturbed = self.step_clean, self.step_perturbed
        if nan_inf_filter and isinstance(clean, torch.Tensor) and isinstance(perturbed, torch.Tensor):
            finite = torch.isfinite(clean) & torch.isfinite(perturbed)
            clean = torch.where(finite, clean, torch.zeros_like(clean))
            perturbed = torch.where(finite, perturbed, torch.zeros_like(perturbed))
            self.counted = self.counted + finite.float()
        else:
            self.counted = self.counted + 1.0
        self.clean_loss = self.clean_loss + clean
        self.perturbed_loss = self.perturbed_loss + perturbed
        self.step_clean, self.step_perturbed = 0.0, 0.0
        self.steps += 1

    def add_perturbation(self, norm: torch.Tensor, skipped: torch.Tensor) -> None:
        self.grad_norm = self.grad_norm + torch.where(skipped, torch.zeros_like(norm), norm)
        self.skipped = self.skipped + skipped.float()
        self.perturbations += 1

    def pop(self, accelerator) -> dict[str, float]:
        """Window averages, reduced across processes (a collective: every rank calls `log` with the loss)."""
        logs = {}
        if self.rho_steps:
            logs["sam_rho"] = self.rho_sum / self.rho_steps
        if self.steps:
            values = torch.stack(
                [
                    torch.as_tensor(v, dtype=torch.float32, device=accelerator.device).reshape(())
                    for v in (self.clean_loss, self.perturbed_loss, self.grad_norm, self.skipped, self.counted)
                ]
            )
            if accelerator.num_processes > 1:
                values = accelerator.reduce(values, reduction="mean")
            clean, perturbed, norm, skipped, counted = values.tolist()
            unskipped = self.perturbations - skipped
            logs.update(
                sam_perturbed_loss=perturbed / counted if counted > 0 else float("nan"),
                sam_sharpness=(perturbed - clean) / counted if counted > 0 else float("nan"),
                sam_grad_norm=norm / unskipped if unskipped > 0 else float("nan"),
                sam_skipped=skipped / self.perturbations if self.perturbations else 0.0,
            )
        self.reset()
        return logs
