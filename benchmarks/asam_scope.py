"""Where ASAM's perturbation goes on a model with biases, under the two rules in use for which parameters T scales.

ASAM (Kwon et al. 2021): e = rho T^2 g / ||T g|| with T = |w| + eta elementwise. hf_sam (like davda54/sam and
pytorch_optimizer) applies T to every perturbed parameter; the authors' code (SamsungLabs/ASAM, `if 'weight' in n`)
applies it to parameters whose name contains "weight" only, T = 1 for the rest (biases). The paper's scale-invariance
argument (rescaling a ReLU layer's weights and bias by c > 0 and the next layer's weights by 1/c leaves the function
unchanged) moves the bias with the weights, so hf_sam scales both. This prints the share of ||e||^2 that lands on the
biases under each rule, for a small MLP after a few SGD steps (docs/concepts.md quotes it).

    python benchmarks/asam_scope.py
"""

from __future__ import annotations

import torch
from torch import nn


def bias_share(model: nn.Module, weights_only: bool, rho: float = 0.5, eta: float = 0.01) -> float:
    """The fraction of ||e||^2 on parameters whose name contains "bias", with the gradients in `.grad`."""
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    scales = [(p.detach().abs() + eta) if not weights_only or "weight" in n else torch.ones_like(p) for n, p in named]
    tg = [t * p.grad for t, (_, p) in zip(scales, named)]
    norm = torch.sqrt(sum((v**2).sum() for v in tg))
    e = [rho * t * v / norm for t, v in zip(scales, tg)]
    total = sum((v**2).sum() for v in e)
    return float(sum((v**2).sum() for v, (n, _) in zip(e, named) if "bias" in n) / total)


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(256, 20), torch.randint(0, 4, (256,))
    for _ in range(21):  # 20 steps, then the gradient the perturbation is taken from
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if _ < 20:
            optimizer.step()
    every, weights = bias_share(model, weights_only=False), bias_share(model, weights_only=True)
    print(
        f"share of ||e||^2 on the biases: T on every parameter (hf_sam) {100 * every:.2f}%, "
        f"T on weights only (the authors' code) {100 * weights:.2f}%"
    )


if __name__ == "__main__":
    main()
