"""SAM's engine on an FSDP2 (`fully_shard`) model against the unsharded model (launched with `torchrun`, gloo on CPU).

Accelerate enables FSDP only for accelerator devices, so the Trainer cannot shard on CPU; this script runs the
mixin's `accumulation="exact"`, `sync="global"` step by hand with the same pieces the mixin uses
(`gradient_sync`, `WeightBackup`, `perturb_`, `restore_`): clean pass over the accumulation window with
synchronisation only on its last micro-batch, one perturbation from the reduce-scattered (DTensor) gradient,
the window again at w + e, exact restore, SGD step. Rank r feeds the r-th slice of each global micro-batch.
Rank 0 also runs the same step unsharded, on the whole global micro-batches, in the same process (no collective).

Usage: torchrun --nproc_per_node 2 fsdp2_engine.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for the shared tiny model
from _process_group import end_process_group  # noqa: E402
from testing_utils import lm_dataset, tiny_llama  # noqa: E402

from hf_sam.distributed import gradient_sync  # noqa: E402
from hf_sam.perturbation import WeightBackup, perturb_, restore_  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 2
LR = 0.5
RHO = 0.5
CASES = {  # name: (gradient accumulation steps, adaptive, shard_norm)
    "sam-ga2": (2, False, False),
    "asam-ga2": (2, True, False),
    "sam-ga1": (1, False, False),
    # Control, the mistake the engine must avoid: each rank normalises e by its own shard's gradient norm.
    "sam-ga2-shard-norm": (2, False, True),
}


def shard_only(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The local shards as plain tensors carrying their local gradients: `perturb_` then sees one shard only."""
    local = [p.to_local() for p in params]
    for shard, p in zip(local, params):
        shard.grad = p.grad.to_local()
    return local


def sam_step(model, optimizer, backup, window, adaptive, shard_norm=False) -> dict[str, float]:
    """One SAM step (exact accumulation, global sync) over the micro-batches of `window`; returns diagnostics."""
    last = len(window) - 1
    for i, ids in enumerate(window):  # clean pass: synchronise on the last micro-batch only, as the Trainer does
        with gradient_sync(model, enabled=i == last):
            (model(input_ids=ids, labels=ids).loss / len(window)).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    sharded = all(isinstance(p.grad, DTensor) for p in params)
    backups = backup.buffers_for(params)
    if shard_norm and sharded:
        norm, skipped = perturb_(shard_only(params), [b.to_local() for b in backups], RHO, adaptive=adaptive)
    else:
        norm, skipped = perturb_(params, backups, RHO, adaptive=adaptive)
    for p in params:
        p.grad = None
    for i, ids in enumerate(window):  # perturbed pass at w + e
        with gradient_sync(model, enabled=i == last):
            (model(input_ids=ids, labels=ids).loss / len(window)).backward()
    restore_(params, backups)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"norm": float(norm), "skipped": bool(skipped), "sharded_grads": sharded}


def train(model, windows, adaptive, shard_norm=False) -> list[dict[str, float]]:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    backup = WeightBackup()
    return [sam_step(model, optimizer, backup, window, adaptive, shard_norm) for window in windows]


def full_state(model) -> dict[str, torch.Tensor]:
    """Unsharded weights (a collective for DTensors: every rank calls it)."""
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()
    }


def partly_sharded() -> dict[str, float | bool]:
    """Only the first decoder layer sharded, the rest plain tensors: norm, w + e and restore against one process.

    Every rank feeds the same batch, so the plain (unsynchronised) gradients agree across ranks.
    """
    ids = torch.tensor(lm_dataset(n=GLOBAL_BATCH, seed=1)["input_ids"])
    model, reference = tiny_llama(seed=0), tiny_llama(seed=0)
    fully_shard(model.model.layers[0])
    for m in (model, reference):
        m(input_ids=ids, labels=ids).loss.backward()
    params, ref_params = list(model.parameters()), list(reference.parameters())
    kinds = {isinstance(p, DTensor) for p in params}
    w = [p.detach().clone() for p in ref_params]
    g = [p.grad for p in ref_params]
    want = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
    backups = WeightBackup().buffers_for(params)
    norm, _ = perturb_(params, backups, RHO)

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    error = max(float((full(p).detach() - (w0 + RHO * g0 / want)).abs().max()) for p, w0, g0 in zip(params, w, g))
    restore_(params, backups)
    exact = all(torch.equal(full(p).detach(), w0) for p, w0 in zip(params, w))
    return {"mixed": kinds == {True, False}, "norm": float(norm), "want": float(want), "error": error, "exact": exact}


def sync_switch() -> dict[str, bool]:
    """`gradient_sync` on a model whose root is not sharded: it must reach every sharded sub-module."""
    ids = torch.tensor(lm_dataset(n=GLOBAL_BATCH, seed=1)["input_ids"])
    model = tiny_llama(seed=0)
    for layer in model.model.layers:
        fully_shard(layer)
    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    with gradient_sync(model, enabled=False):
        model(input_ids=ids, labels=ids).loss.backward()
    off = all(p.grad is None for p in sharded)  # nothing reduce-scattered: the gradients wait inside FSDP
    with gradient_sync(model, enabled=True):
        model(input_ids=ids, labels=ids).loss.backward()
    on = all(p.grad is not None for p in sharded)
    return {"layers": len(model.model.layers), "off": off, "on": on}


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_batch = GLOBAL_BATCH // world
    results = {}
    for name, (accumulation_steps, adaptive, shard_norm) in CASES.items():
        ids = torch.tensor(lm_dataset(n=GLOBAL_BATCH * accumulation_steps * STEPS, seed=1)["input_ids"])
        global_windows = [
            list(w.split(GLOBAL_BATCH)) for w in ids.split(GLOBAL_BATCH * accumulation_steps)
        ]  # per step, the global micro-batches
        local_windows = [[m[rank * local_batch : (rank + 1) * local_batch] for m in w] for w in global_windows]

        model = tiny_llama(seed=0)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        diagnostics = train(model, local_windows, adaptive, shard_norm)
        sharded = full_state(model)
        if rank == 0:
            reference = tiny_llama(seed=0)
            reference_diagnostics = train(reference, global_windows, adaptive)
            results[name] = {
                "sharded": sharded,
                "unsharded": full_state(reference),
                "initial": full_state(tiny_llama(seed=0)),
                "diagnostics": diagnostics,
                "reference_diagnostics": reference_diagnostics,
            }
        dist.barrier()
    results["partly-sharded"] = partly_sharded()
    results["sync-switch"] = sync_switch()
    if rank == 0:
        torch.save(results, out / "fsdp2.pt")
    end_process_group()


if __name__ == "__main__":
    main()
