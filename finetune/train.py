"""The training loop: explicit and short, on `accelerate.Accelerator`.

Why not transformers' Trainer: it builds full-vocabulary logits for every position and
normalises accumulation per micro-batch, both wrong for this model (see shared/DESIGN.md).

One optimizer step = `grad_accum` micro-batches per process. The loss of a step is the sum of
token losses over the whole window divided by the number of label tokens in that window
(across processes), so a batch of 4 and 4 batches of 1 give the same gradients.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_tools.collate import collate, collate_packed, length_grouped_batches, pack_rows, random_batches
from data_tools.render import IGNORE
from finetune.errors import UserError
from finetune.losses import chunked_ce_sum, full_ce_sum
from finetune.recipe import Recipe, dump_recipe

# ---------------------------------------------------------------- model-side helpers


def unwrap(model):
    """The transformers model under DDP/LossForward/PEFT wrappers (LoRA layers are injected in place)."""
    model = unwrap_peft(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def unwrap_peft(model):
    """The PEFT model under DDP (`.module`) and `LossForward` (`.model`) wrappers."""
    while True:
        if isinstance(model, LossForward):
            model = model.model
        elif hasattr(model, "module"):
            model = model.module
        else:
            return model


def to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = {kk: vv.to(device) for kk, vv in v.items()}
        elif torch.is_tensor(v):
            # Pixel values and audio frames enter in the compute dtype: under bitsandbytes the
            # vision embedder can't cast them itself (its weight is uint8).
            v = v.to(device)
            out[k] = v.to(dtype) if v.is_floating_point() else v
        else:
            out[k] = v
    return out


def loss_labels(batch: dict) -> torch.Tensor:
    """Labels that carry loss. In a packed row the first token of each sample would be
    predicted from the previous sample's last token: those positions (position id 0) never
    count, exactly as position 0 of an unpacked row never does."""
    labels = batch["labels"]
    if "position_ids" in batch:
        labels = labels.masked_fill(batch["position_ids"].to(labels.device) == 0, IGNORE)
    return labels


def loss_sum(model, batch: dict, *, chunked: bool, chunk_size: int = 256,
             offload: bool = False) -> torch.Tensor:
    """Summed CE over label tokens of one micro-batch (see finetune.losses)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = loss_labels(batch)
    if chunked:
        cg = unwrap(model)
        # Only the decoder's saved tensors are offloaded; the CE chunks recompute their logits.
        with offload_activations(offload):
            hidden = cg.model(**inputs, use_cache=False).last_hidden_state
        cap = cg.config.get_text_config().final_logit_softcapping
        return chunked_ce_sum(hidden, labels, cg.lm_head.weight, cap, chunk_size)
    with offload_activations(offload):
        logits = model(**inputs, use_cache=False).logits
    return full_ce_sum(logits, labels)


class LossForward(torch.nn.Module):
    """The model and its loss as one module, so DDP (or FSDP) wraps a forward that does it all.

    The chunked path calls the inner transformers model for hidden states; called from outside
    a DDP wrapper, that forward would skip DDP's own: no gradient all-reduce, no search for
    unused LoRA parameters, and the ranks would silently drift apart.
    """

    def __init__(self, model, *, chunked: bool, chunk_size: int = 256, offload: bool = False):
        super().__init__()
        self.model = model
        self.chunked, self.chunk_size, self.offload = chunked, chunk_size, offload

    def forward(self, batch: dict) -> torch.Tensor:
        return loss_sum(self.model, batch, chunked=self.chunked, chunk_size=self.chunk_size,
                        offload=self.offload)


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Tensors saved for backward go to CPU memory (pinned on CUDA) and come back on unpack.

    Under non-reentrant checkpointing the only tensors a decoder layer saves outside its own
    recompute hooks are its inputs, so this is what moves checkpointed layer inputs off the
    GPU. Parameters (frozen or LoRA) are never copied, nor tensors under `min_bytes`.
    `saved_bytes` counts what went through (tests check the mechanism ran).
    """

    def __init__(self, min_bytes: int = 1024):
        self.saved_bytes = 0
        pin = torch.cuda.is_available()

        def pack(t: torch.Tensor):
            nbytes = t.numel() * t.element_size()
            if isinstance(t, torch.nn.Parameter) or nbytes < min_bytes:
                return t
            self.saved_bytes += nbytes
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin and t.is_cuda)
            host.copy_(t, non_blocking=t.is_cuda)
            return (t.device, host)

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=host.is_pinned())

        super().__init__(pack, unpack)


def offload_activations(enabled: bool):
    """Context: checkpointed layer inputs live in (pinned) CPU memory until backward needs them."""
    return ActivationOffload() if enabled else contextlib.nullcontext()


def n_labels(batch: dict) -> int:
    return int((loss_labels(batch)[:, 1:] != IGNORE).sum())


# ---------------------------------------------------------------- optimizer and schedule


def make_optimizer(params, t, device: str):
    params = [p for p in params if p.requires_grad]
    name = t.optimizer
    if name == "adamw":
        # One fused kernel per step instead of a dozen foreach passes (CPU and CUDA alike); the
        # update is the same AdamW.
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay,
                                 fused=device in ("cpu", "cuda"))
    import bitsandbytes as bnb

    if name.startswith("paged") and device != "cuda":
        name = name.removeprefix("paged_")  # paging needs CUDA unified memory
    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw8bit": bnb.optim.PagedAdamW8bit, "adamw": torch.optim.AdamW}[name]
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(optimizer, t):
    warmup = int(t.warmup * t.max_steps) if t.warmup < 1 else int(t.warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if t.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, t.max_steps - warmup)
        if t.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------- data order


class BatchPlan:
    """Deterministic order of micro-batches: epoch e uses seed+e, so a position resumes exactly."""

    def __init__(self, data, t, pad_id: int, text_cfg, world: int, rank: int, max_len: int):
        self.data, self.t, self.pad_id = data, t, pad_id
        self.lengths = data.lengths if hasattr(data, "lengths") else [len(s["input_ids"]) for s in data]
        self.world, self.rank, self.max_len = world, rank, max_len
        self.sliding = text_cfg.sliding_window
        self.layer_types = list(text_cfg.layer_types)
        self._epoch, self._batches = -1, []

    def _plan(self, epoch: int) -> list[list[int]]:
        seed = self.t.seed + epoch
        global_bs = self.t.batch_size * self.world
        if self.t.packing:
            # Rows of packed samples, then batches of rows; each rank takes its slice.
            order = list(range(len(self.lengths)))
            random.Random(seed).shuffle(order)
            rows = pack_rows(self.lengths, order, self.max_len)
            random.Random(seed + 1).shuffle(rows)
            return [rows[i:i + global_bs] for i in range(0, len(rows) - global_bs + 1, global_bs)]
        if self.t.group_by_length:
            batches = length_grouped_batches(self.lengths, global_bs, seed)
        else:
            batches = random_batches(len(self.lengths), global_bs, seed)
        return [b for b in batches if len(b) == global_bs] or batches

    def micro_batch(self, position: int) -> dict:
        """The `position`-th micro-batch of the whole run (this rank's share)."""
        per_epoch = len(self._plan_for(0))
        epoch, i = divmod(position, per_epoch)
        glob = self._plan_for(epoch)[i]
        mine = glob[self.rank * self.t.batch_size:(self.rank + 1) * self.t.batch_size]
        if self.t.packing:
            return collate_packed([[self.data[j] for j in row] for row in mine], self.pad_id,
                                  self.sliding, self.layer_types, trim_tail=True)
        return collate([self.data[j] for j in mine], self.pad_id, trim_tail=True)

    def _plan_for(self, epoch: int):
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._plan(epoch)
            if not self._batches:
                raise UserError("train.batch_size", "the dataset is smaller than one global batch",
                                "Lower train.batch_size or add data")
        return self._batches


class StreamPlan:
    """The `BatchPlan` interface over `StreamingSamples` (`data.streaming: true`): micro-batch
    `position` of this rank. Resuming restarts the stream at `position`, so the skipped samples
    are rendered again (cheap next to training on them)."""

    def __init__(self, stream, t, pad_id: int, world: int, rank: int):
        self.stream, self.t, self.pad_id, self.world, self.rank = stream, t, pad_id, world, rank
        self._it, self._next = None, -1

    def micro_batch(self, position: int) -> dict:
        if self._it is None or position != self._next:
            self._it = self.stream.micro_batches(self.t.batch_size, self.pad_id, rank=self.rank,
                                                 world=self.world, start=position,
                                                 group_by_length=self.t.group_by_length,
                                                 trim_tail=True)
        self._next = position + 1
        return next(self._it)


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, position: int, keep: int) -> Path:
    """Write to step-N.tmp, then rename: a kill never leaves a half checkpoint as the newest."""
    ckdir = out / "checkpoints"
    final = ckdir / f"step-{step}"
    tmp = ckdir / f"step-{step}.tmp"
    for stale in ckdir.glob("step-*.tmp"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    unwrap_peft(model).save_pretrained(tmp / "adapter")
    _test_pause_in_save(step)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "step": step, "position": position}, tmp / "state.pt")
    (tmp / "COMPLETE").write_text(str(step))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(complete_checkpoints(out), key=lambda p: int(p.name[5:]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _test_pause_in_save(step: int) -> None:
    """Test hook, inert unless FINETUNE_TEST_SLOW_SAVE="STEP:SECONDS" is set: sleep halfway
    through writing checkpoint STEP (adapter written, optimizer state not yet), so a test can
    SIGKILL a real run in the middle of a save (tests/test_resume_ddp.py)."""
    spec = os.environ.get("FINETUNE_TEST_SLOW_SAVE")
    if spec:
        at, _, seconds = spec.partition(":")
        if int(at) == step:
            time.sleep(float(seconds))


def complete_checkpoints(out: Path) -> list[Path]:
    ckdir = Path(out) / "checkpoints"
    if not ckdir.exists():
        return []
    return [p for p in ckdir.glob("step-*") if not p.name.endswith(".tmp")
            and (p / "COMPLETE").exists() and p.name[5:].isdigit()]


def latest_checkpoint(out: Path) -> Path | None:
    cks = complete_checkpoints(out)
    return max(cks, key=lambda p: int(p.name[5:])) if cks else None


def load_checkpoint(ck: Path, model, optimizer, scheduler) -> tuple[int, int]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(ck / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(unwrap_peft(model), weights)
    # Our own file; weights_only refuses anything but tensors and plain containers.
    state = torch.load(ck / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"], state["position"]


# ---------------------------------------------------------------- logging


class MetricsLog:
    """`metrics.jsonl`, one line per step, appended every `every` steps and at checkpoints.

    On resume the lines after the checkpoint's step (written before the kill) are dropped,
    so the file always tells the story of the weights that exist.
    """

    def __init__(self, out: Path, accelerator, *, resume_step: int = 0, every: int = 1):
        self.path = out / "metrics.jsonl"
        self.acc, self.every = accelerator, every
        self.rows: list[dict] = []
        if resume_step and self.path.exists():
            rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            self.rows = [r for r in rows if r["step"] <= resume_step]
        self._written = len(self.rows)
        if self.acc.is_main_process:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.acc.is_main_process:
            self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])
        if row["step"] % self.every == 0:
            self.flush()

    def flush(self) -> None:
        if self.acc.is_main_process and self._written < len(self.rows):
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in self.rows[self._written:]))
        self._written = len(self.rows)

    def plot(self, out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.rows if "loss" in r]
        evals = [r for r in self.rows if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)


# ---------------------------------------------------------------- the run


@dataclass
class TrainResult:
    adapter_dir: Path
    losses: list[float]
    steps: int
    seconds: float
    tokens_per_s: float


def _eval_loss(model, data, pad_id, dtype, device, t) -> dict:
    """Mean token loss on the eval set, overall and by sample modality.

    One sample per forward: the per-modality sums need per-sample losses, and the eval set
    is small. Runs on every rank (no gradients, so no DDP involvement)."""
    peft_model = unwrap_peft(model)
    sums: dict[str, list[float]] = {}
    peft_model.eval()
    with torch.no_grad():
        for j in range(len(data)):
            s = data[j]
            b = to_device(collate([s], pad_id, trim_tail=True), device, dtype)
            ls = float(loss_sum(peft_model, b, chunked=t.chunked_ce, chunk_size=t.ce_chunk_size))
            acc = sums.setdefault(s["modality"], [0.0, 0])
            acc[0] += ls
            acc[1] += n_labels(b)
    peft_model.train()
    out = {f"eval_loss_{m}": v[0] / max(1, v[1]) for m, v in sums.items()}
    out["eval_loss"] = sum(v[0] for v in sums.values()) / max(1, sum(v[1] for v in sums.values()))
    return out


def train(recipe: Recipe, *, resume: bool = False, log=print) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from data_tools.pipeline import prepare
    from finetune.lora import format_table, trainable_table
    from finetune.model import (
        attach_lora,
        base_family,
        enable_gradient_checkpointing,
        load_base,
        load_processor,
    )

    t = recipe.train
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trackers = [r for r in t.report_to if r != "wandb" or _has_wandb()]
    # find_unused_parameters: a batch without images (or audio) leaves those LoRA weights out of
    # the graph. `cpu` under torchrun: accelerate only starts gloo DDP when told it is on CPU.
    acc = Accelerator(cpu=_multi_process_cpu(), log_with=trackers or None, project_dir=str(out),
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    device = acc.device.type
    if device == "cpu":
        _cpu_threads(acc.num_processes, log if acc.is_main_process else None)
    set_seed(t.seed)
    family = base_family(recipe.model.base, recipe.model.trust_remote_code)
    processor = load_processor(recipe.model.base, recipe.data.image_tokens, recipe.model.trust_remote_code)
    with acc.main_process_first():
        data = prepare(recipe, processor, recipe.model.base, rejects_path=out / "rejects.jsonl",
                       chat=family.chat, log=log if acc.is_main_process else None)
    if acc.is_main_process:
        (out / "data_stats.json").write_text(json.dumps(data.stats, indent=1))
        dump_recipe(recipe, out / "recipe.lock.yaml")

    model = load_base(recipe.model.base, quantization=recipe.model.quantization, dtype=recipe.model.dtype,
                      device=device, double_quant=recipe.model.double_quant,
                      quant_storage=recipe.model.quant_storage,
                      trust_remote_code=recipe.model.trust_remote_code,
                      allow_pickle=recipe.model.allow_pickle)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    set_seed(t.seed)  # LoRA init is seeded the same whatever loading consumed
    model = attach_lora(model, recipe.lora, family)
    if acc.is_main_process:
        log("trainable parameters by part:\n" + format_table(trainable_table(model, family)))
    model.train()
    dtype = unwrap(model).model.language_model.embed_tokens.weight.dtype
    cdtype = torch.float32 if device == "cpu" else (torch.bfloat16 if recipe.model.dtype == "auto"
                                                    else dtype)
    optimizer = make_optimizer(model.parameters(), t, device)
    scheduler = make_scheduler(optimizer, t)
    model, optimizer = acc.prepare(LossForward(model, chunked=t.chunked_ce, chunk_size=t.ce_chunk_size,
                                               offload=t.offload_activations), optimizer)

    text_cfg = unwrap(model).config.get_text_config()
    pad_id = processor.tokenizer.pad_token_id
    if getattr(data, "streaming", False):
        plan = StreamPlan(data.train, t, pad_id, acc.num_processes, acc.process_index)
    else:
        plan = BatchPlan(data.train, t, pad_id, text_cfg, acc.num_processes, acc.process_index,
                         recipe.data.max_seq_len)
    step, position = 0, 0
    if resume:
        ck = latest_checkpoint(out)
        if ck is None:
            log(f"resume: no complete checkpoint in {out / 'checkpoints'}, starting fresh")
        else:
            step, position = load_checkpoint(ck, model, optimizer, scheduler)
            log(f"resume: continuing from {ck} (step {step})")
    if acc.is_main_process:
        acc.init_trackers("finetune", config={"lr": t.lr, "r": recipe.lora.r, "batch_size": t.batch_size})
    metrics = MetricsLog(out, acc, resume_step=step, every=t.log_every)

    from tqdm import tqdm

    bar = tqdm(total=t.max_steps, initial=step, desc="train", disable=not acc.is_main_process,
               dynamic_ncols=True)
    t0, real_tokens = time.time(), 0
    losses = []
    try:
        while step < t.max_steps:
            micro = [to_device(plan.micro_batch(position + i), acc.device, cdtype) for i in range(t.grad_accum)]
            position += t.grad_accum
            loss, tokens = _optimizer_step(model, optimizer, scheduler, micro, acc, t)
            step += 1
            real_tokens += sum(int(b["input_ids"].ne(pad_id).sum()) for b in micro) * acc.num_processes
            losses.append(loss)
            row = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "tokens": tokens,
                   "tokens_per_s": real_tokens / max(1e-9, time.time() - t0), "elapsed": time.time() - t0}
            if t.eval_every and step % t.eval_every == 0 and len(data.eval):
                row.update(_eval_loss(model, data.eval, pad_id, cdtype, acc.device, t))
            metrics.write(row)
            if t.preview_every and step % t.preview_every == 0 and acc.is_main_process:
                _preview(model, processor, recipe, out, step, log, acc)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if t.save_every and step % t.save_every == 0 and step < t.max_steps:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    metrics.flush()
                    save_checkpoint(out, step, model, optimizer, scheduler, position, t.keep_checkpoints)
    except torch.cuda.OutOfMemoryError:
        raise UserError("train", f"CUDA out of memory at step {step + 1}",
                        "Lower data.max_seq_len or train.batch_size, set train.chunked_ce=true, "
                        "train.gradient_checkpointing=true or train.optimizer=adamw8bit; "
                        "`finetune plan RECIPE` predicts what fits") from None
    finally:
        bar.close()
    acc.wait_for_everyone()
    adapter_dir = out / "adapter"
    if acc.is_main_process:
        metrics.flush()
        if step >= t.max_steps:
            unwrap_peft(model).save_pretrained(adapter_dir)
            metrics.plot(out)
    if acc.num_processes > 1:
        _check_ranks_agree(model, acc, out, log)
    acc.end_training()
    if acc.num_processes > 1 and torch.distributed.is_initialized():
        # Left to interpreter exit, gloo's threads can abort the process ("terminate called
        # without an active exception") after a successful run.
        torch.distributed.destroy_process_group()
    seconds = time.time() - t0
    return TrainResult(adapter_dir, losses, step, seconds, real_tokens / max(seconds, 1e-9))


def _optimizer_step(model, optimizer, scheduler, micro: list[dict], acc, t) -> tuple[float, int]:
    """Accumulate over the window, normalised by its label tokens across all processes."""
    local = torch.tensor(float(sum(n_labels(b) for b in micro)), device=acc.device)
    total = float(acc.reduce(local, reduction="sum")) if acc.num_processes > 1 else float(local)
    total = max(total, 1.0)
    loss_total = 0.0
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1
        ctx = contextlib.nullcontext() if sync else acc.no_sync(model)
        with ctx:
            ls = _forward_loss(model, batch, t)
            # DDP averages gradients over processes; scale back so the step is a true token mean.
            acc.backward(ls * acc.num_processes / total)
        loss_total += float(ls.detach())
    if t.max_grad_norm > 0:
        acc.clip_grad_norm_(model.parameters(), t.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if acc.num_processes > 1:
        loss_total = float(acc.reduce(torch.tensor(loss_total, device=acc.device), reduction="sum"))
    return loss_total / total, int(total)


def _forward_loss(model, batch: dict, t) -> torch.Tensor:
    """Through the (DDP-wrapped) LossForward when training; a bare PEFT model works too."""
    inner = model.module if hasattr(model, "module") else model
    if isinstance(inner, LossForward):
        return model(batch)
    return loss_sum(model, batch, chunked=t.chunked_ce, chunk_size=t.ce_chunk_size,
                    offload=t.offload_activations)


def _multi_process_cpu() -> bool:
    """Several processes (torchrun, accelerate launch) and no accelerator: DDP over gloo."""
    has_accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return not has_accel and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _cpu_threads(num_processes: int, log) -> None:
    """One intra-op thread per two cores and process, unless OMP_NUM_THREADS says otherwise.

    On CPU the ops of a small model are tiny; with every core busy (other processes, DDP
    ranks, data work) OpenMP threads spin waiting for each other: on 2 shared cores a step
    took 5-30x longer with 2 threads than with 1 (checked here).
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    n = max(1, cores // (2 * num_processes))
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
        if log:
            log(f"cpu: {n} torch thread(s) per process (set OMP_NUM_THREADS to choose)")


def _check_ranks_agree(model, acc, out: Path, log) -> None:
    """After a multi-process run every rank must hold the same adapter; a mismatch means the
    gradient sync broke, and the saved adapter would be just one rank's."""
    import hashlib

    from accelerate.utils import gather_object

    h = hashlib.sha256()
    for name, p in sorted(unwrap_peft(model).named_parameters(), key=lambda x: x[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    digests = gather_object([h.hexdigest()])
    if acc.is_main_process:
        (out / "rank_digests.json").write_text(json.dumps(digests))
        if len(set(digests)) != 1:
            raise RuntimeError(f"adapters differ across ranks ({digests}): gradients were not synchronised")
        log(f"adapter identical on {len(digests)} ranks (sha256 {digests[0][:12]})")


def _preview(model, processor, recipe, out: Path, step: int, log, acc) -> None:
    """Answers on a few fixed held-out items: console, previews.jsonl, tensorboard text."""
    from finetune.generation import preview_items

    rows = preview_items(unwrap_peft(model), processor, recipe)
    with open(out / "previews.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({"step": step} | r) + "\n")
    for r in rows:
        log(f"preview step {step} [{r['id']}]: {r['output']!r} (reference {r['reference']!r})")
    if "tensorboard" in recipe.train.report_to:
        writer = acc.get_tracker("tensorboard", unwrap=True)
        text = "\n\n".join(f"**{r['id']}** ({r['modality']}): `{r['output']}` — reference `{r['reference']}`"
                           for r in rows)
        writer.add_text("previews", text, step)


def _has_wandb() -> bool:
    try:
        import wandb  # noqa: F401

        return True
    except ImportError:
        return False
