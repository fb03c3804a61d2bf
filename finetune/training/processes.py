"""The processes a run is made of: the accelerator, wrong launches refused, CPU threads, ranks that agree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from finetune.errors import UserError
from finetune.training.metrics import available_trackers


def accelerator(t, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    refuse_short_launch()
    # find_unused_parameters: a batch without images (or audio) leaves those LoRA weights out of
    # the graph. `cpu` under torchrun: accelerate only starts gloo DDP when told it is on CPU.
    trackers = available_trackers(t.report_to)
    return Accelerator(cpu=_multi_process_cpu(), log_with=trackers or None, project_dir=str(out),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def refuse_short_launch() -> None:
    """`accelerate launch --num_processes N` without `--multi_gpu` (or an FSDP/DDP config) runs
    ONE process: accelerate's simple launcher sets the rendezvous address for N but starts no
    others, and says nothing. Seen as: launched by accelerate's simple launcher (which alone sets
    ACCELERATE_USE_CPU), an address for several processes, and no WORLD_SIZE."""
    env = os.environ
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        asked = _asked_processes()
        raise UserError("accelerate launch", f"asked for {asked or 'several'} processes but started one "
                        "(without --multi_gpu accelerate runs a single process)",
                        "Launch with --multi_gpu --num_processes N, or --config_file "
                        "configs/accelerate/ddp.yaml (or fsdp2.yaml), or torchrun --nproc_per_node N")


def refuse_several_processes(verb: str) -> None:
    """A one-process verb (merge) started under FSDP or several processes: each would load the
    whole base (FSDP's sharding applies to training only) and write the same files."""
    env = os.environ
    world, fsdp = int(env.get("WORLD_SIZE", "1")), env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if world > 1 or fsdp:
        how = "FSDP" if fsdp else f"{world} processes"
        raise UserError(verb, f"started under {how}: {verb} runs in one process, on the full-precision "
                        "base (sharding is for training)", f"Run `finetune {verb} ...` directly, without "
                        "accelerate launch or torchrun")


def _asked_processes() -> int | None:
    """--num_processes of the `accelerate launch` that started this process (Linux), if readable."""
    try:
        argv = open(f"/proc/{os.getppid()}/cmdline", "rb").read().decode().split("\0")
    except OSError:
        return None
    for i, arg in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(argv) and argv[i + 1].isdigit():
                return int(argv[i + 1])
            if arg.startswith(flag + "=") and arg.split("=", 1)[1].isdigit():
                return int(arg.split("=", 1)[1])
    return None


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


def free_memory_gib(device: torch.device) -> float:
    """Memory free for this process now: the GPU's (torch.cuda.mem_get_info) or the host's."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    import psutil

    return psutil.virtual_memory().available / 2**30
