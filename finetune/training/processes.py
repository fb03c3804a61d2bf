"""The processes a run is made of: the accelerator, CPU threads per process, ranks that must agree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from finetune.training.metrics import available_trackers


def accelerator(t, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # find_unused_parameters: a batch without images (or audio) leaves those LoRA weights out of
    # the graph. `cpu` under torchrun: accelerate only starts gloo DDP when told it is on CPU.
    trackers = available_trackers(t.report_to)
    return Accelerator(cpu=_multi_process_cpu(), log_with=trackers or None, project_dir=str(out),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])




def _multi_process_cpu() -> bool:
    """Several processes (torchrun, accelerate launch) and no accelerator: DDP over gloo."""
    has_accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return not has_accel and int(os.environ.get("WORLD_SIZE", "1")) > 1


def cpu_threads_for(num_processes: int) -> int:
    """One intra-op thread per two cores and process.

    On CPU the ops of a small model are tiny; with every core busy (other processes, DDP
    ranks, data work) OpenMP threads spin waiting for each other: on 2 shared cores a step
    took 5-30x longer with 2 threads than with 1 (checked here).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // (2 * num_processes))


def set_cpu_threads(num_processes: int, log) -> None:
    if "OMP_NUM_THREADS" in os.environ:
        return
    n = cpu_threads_for(num_processes)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
        log(f"cpu: {n} torch thread(s) per process (set OMP_NUM_THREADS to choose)")


def check_ranks_agree(model, acc, out: Path, log) -> None:
    """After a multi-process run every rank must hold the same adapter; a mismatch means the
    gradient sync broke, and the saved adapter would be just one rank's."""
    import hashlib

    from accelerate.utils import gather_object

    h = hashlib.sha256()
    inner = model.module if hasattr(model, "module") else model  # LossForward: model + objective
    for name, p in sorted(inner.named_parameters(), key=lambda x: x[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    digests = gather_object([h.hexdigest()])
    if acc.is_main_process:
        (out / "rank_digests.json").write_text(json.dumps(digests))
        if len(set(digests)) != 1:
            raise RuntimeError(f"adapters differ across ranks ({digests}): gradients were not synchronised")
        log(f"adapter identical on {len(digests)} ranks (sha256 {digests[0][:12]})")
