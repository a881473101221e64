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
        self.perturbations = 0  # one per step ("exact") or per micro-batch ("micro")
        self.rho_sum = 0.0
        self.rho_steps = 0
        self.begin_step()

    def begin_step(self) -> None:
        """A new optimizer step: what a step that did not complete added is dropped."""
        self.step_clean: torch.Tensor | float = 0.0
        self.step_perturbed: torch.Tensor | float = 0.0
        self.step_norm: torch.Tensor | float = 0.0
        self.step_skipped: torch.Tensor | float = 0.0
        self.step_perturbations = 0

    def add_clean(self, loss: torch.Tensor) -> None:
        self.step_clean = self.step_clean + loss

    def add_perturbed(self, loss: torch.Tensor) -> None:
        self.step_perturbed = self.step_perturbed + loss

    def add_perturbation(self, norm: torch.Tensor, skipped: torch.Tensor) -> None:
        self.step_norm = self.step_norm + torch.where(skipped, torch.zeros_like(norm), norm)
        self.step_skipped = self.step_skipped + skipped.float()
        self.step_perturbations += 1

    def end_step(self, nan_inf_filter: bool, two_pass: bool, rho: float | None = None) -> None:
        """The step completed: its sums join the window's. `two_pass`: it ran a perturbed pass, whose losses count;
        with the Trainer's `logging_nan_inf_filter`, a step whose clean or perturbed loss is not finite is left out of
        the loss sums (on the device: no host sync). `rho`: the step's scheduled radius, averaged into `sam_rho` (a
        schedule other than "constant")."""
        if rho is not None:
            self.rho_sum += rho
            self.rho_steps += 1
        self.grad_norm = self.grad_norm + self.step_norm
        self.skipped = self.skipped + self.step_skipped
        self.perturbations += self.step_perturbations
        if two_pass:
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
            self.steps += 1
        self.begin_step()

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
