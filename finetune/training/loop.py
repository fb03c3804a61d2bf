"""`finetune train`: the explicit loop on `accelerate.Accelerator`, shared by every objective.

Why not transformers' Trainer: it builds full-vocabulary logits for every position and
normalises accumulation per micro-batch, both wrong for this model (ARCHITECTURE.md).

One optimizer step = `grad_accum` micro-batches per process, normalised by the objective's
weight over the whole window (finetune.training.step). Every `save_every` steps and at the end a
checkpoint is written (finetune.training.checkpoint), so `--resume` continues exactly, also
past the end with a larger `train.max_steps`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.errors import TrainingStopped, UserError
from finetune.memory_tricks import tile_mlp
from finetune.recipe import Recipe, dump_recipe
from finetune.training.batches import BatchPlan, StreamPlan
from finetune.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from finetune.training.metrics import EvalWatch, MetricsLog, available_trackers
from finetune.training.optim import make_optimizer, make_scheduler
from finetune.training.resume import StopRequest, check_resume
from finetune.training.sharding import fsdp_plugin, gather_for_save, is_sharded, refuse_short_launch, shard, \
    sharding_problems
from finetune.training.step import forward_loss, optimizer_step
from finetune.training.wrappers import LossForward, to_device, unwrap, unwrap_peft


@dataclass
class TrainResult:
    adapter_dir: Path
    losses: list[float]
    steps: int
    seconds: float
    tokens_per_s: float


def _silent(*_):
    pass


def train(recipe: Recipe, *, resume: bool = False, log=None, progress: bool | None = None) -> TrainResult:
    """Train `recipe`'s objective; `log` receives progress lines (None: silent), `progress` shows a
    bar (default: when `log` is given)."""
    from accelerate.utils import set_seed

    from finetune import objectives
    from finetune.lora import format_table, trainable_table
    from finetune.model import base_family, enable_gradient_checkpointing, load_processor, load_recipe_base

    progress = log is not None if progress is None else progress
    log = log or _silent
    t = recipe.train
    out = Path(t.output_dir)
    if resume:
        check_resume(recipe, out, log)
    refuse_short_launch()
    fsdp = fsdp_plugin()
    if fsdp is not None:
        sharding_problems(recipe)
    out.mkdir(parents=True, exist_ok=True)
    acc = _accelerator(t, out)
    main_log = log if acc.is_main_process else _silent
    device = acc.device.type
    if device == "cpu":
        _cpu_threads(acc.num_processes, main_log)
    set_seed(t.seed)
    family = base_family(recipe.model.base, recipe.model.trust_remote_code)
    processor = load_processor(recipe.model.base, recipe.data.image_tokens, recipe.model.trust_remote_code)
    data = _prepare_data(recipe, processor, family, acc, out, main_log)

    m = recipe.model
    model = load_recipe_base(m, device)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    objective = objectives.build(recipe)
    pad_id = processor.tokenizer.pad_token_id
    if data.streaming:
        plan = StreamPlan(data.train, t, pad_id, acc.num_processes, acc.process_index, objective.collate)
    else:
        plan = BatchPlan(data.train, t, pad_id, model.config.get_text_config(), acc.num_processes,
                         acc.process_index, recipe.data.max_seq_len, objective.collate)
    if t.epochs is not None:  # known only now: the batches an epoch makes
        steps = max(1, math.ceil(t.epochs * plan.batches_per_epoch() / t.grad_accum))
        t = plan.t = dataclasses.replace(t, max_steps=steps)
        main_log(f"train: {t.epochs:g} epoch(s) of {plan.batches_per_epoch()} micro-batches = {steps} steps")
    set_seed(t.seed)  # LoRA init is seeded the same whatever loading consumed
    model = objective.setup(model, family)
    if t.mlp_tile_tokens:
        tile_mlp(model, t.mlp_tile_tokens, family.mlp_blocks)
    if objective.trains_model:
        main_log("trainable parameters by part:\n" + format_table(trainable_table(model, family)))
    model.train()
    dtype = unwrap(model).model.language_model.embed_tokens.weight.dtype
    cdtype = torch.float32 if device == "cpu" else (torch.bfloat16 if m.dtype == "auto" else dtype)
    if fsdp is not None:  # sharded first: the optimizer holds (and its state follows) the shards
        model = LossForward(model, objective)
        shard(model, fsdp, unwrap(model)._no_split_modules)
        optimizer = make_optimizer(model.parameters(), t, device)
    else:  # weights the objective owns (a drafter) train with the model's
        optimizer = make_optimizer([*model.parameters(), *objective.parameters()], t, device)
        model, optimizer = acc.prepare(LossForward(model, objective), optimizer)
    scheduler = make_scheduler(optimizer, t)
    step, position = 0, 0
    if resume:
        ck = latest_checkpoint(out)
        if ck is None:
            main_log(f"resume: no complete checkpoint in {out / 'checkpoints'}, starting fresh")
        else:
            step, position = load_checkpoint(ck, model, optimizer, scheduler)
            main_log(f"resume: continuing from {ck} (step {step})")
    if acc.is_main_process:
        acc.init_trackers("finetune", config={"lr": t.lr, "r": recipe.lora.r, "batch_size": t.batch_size})
    metrics = MetricsLog(out, acc, resume_step=step, every=t.log_every)

    from tqdm import tqdm

    bar = tqdm(total=t.max_steps, initial=step, desc="train", dynamic_ncols=True,
               disable=not (progress and acc.is_main_process))
    t0, real_tokens, losses = time.time(), 0, []
    watch = EvalWatch(t.early_stopping_patience)
    with StopRequest() as stop:
        try:
            while step < t.max_steps:
                micro = [to_device(plan.micro_batch(position + i), acc.device, cdtype)
                         for i in range(t.grad_accum)]
                position += t.grad_accum
                loss, weight, values = optimizer_step(model, optimizer, scheduler, micro, acc, objective,
                                                      t.max_grad_norm)
                step += 1
                real_tokens += sum(int(b["input_ids"].ne(pad_id).sum()) for b in micro) * acc.num_processes
                losses.append(loss)
                elapsed = time.time() - t0
                row = {"step": step, "loss": loss, **values, "lr": scheduler.get_last_lr()[0], "tokens": weight,
                       "tokens_per_s": real_tokens / max(1e-9, elapsed), "elapsed": elapsed}
                early_stop = False
                if t.eval_every and step % t.eval_every == 0 and len(data.eval):
                    row.update(eval_loss(model, objective, data.eval, pad_id, cdtype, acc.device))
                    improved, early_stop = watch.update(step, row["eval_loss"])
                    if improved and t.keep_best:
                        full = gather_for_save(model, None) if is_sharded(model) else None
                        if acc.is_main_process:
                            objective.save(unwrap_peft(model), out / "best", **_state(full))
                            best = {"step": step, "eval_loss": row["eval_loss"]}
                            (out / "best" / "best.json").write_text(json.dumps(best))
                    main_log(f"step {step}: eval_loss {row['eval_loss']:.4f} (best {watch.best:.4f} at step "
                             f"{watch.best_step})" + (f"; no better for {watch.since} evals: stopping early"
                                                      if early_stop else ""))
                metrics.write(row)
                if t.preview_every and step % t.preview_every == 0 and acc.is_main_process and objective.previews:
                    _preview(model, processor, family.chat, recipe, data.eval, out, step, main_log, acc)
                bar.set_postfix(_postfix(row))
                bar.update(1)
                stopping = _agreed(stop.requested, acc)
                if (t.save_every and step % t.save_every == 0) or step == t.max_steps or stopping or early_stop:
                    acc.wait_for_everyone()
                    ck = out / "checkpoints" / f"step-{step}"
                    full = gather_for_save(model, optimizer) if is_sharded(model) else None
                    if acc.is_main_process:
                        metrics.flush()
                        ck = save_checkpoint(out, step, model, optimizer, scheduler, position, t.keep_checkpoints,
                                             full=full)
                    if stopping and step < t.max_steps:
                        raise TrainingStopped(step, ck)
                if early_stop:
                    break
        except torch.cuda.OutOfMemoryError:
            raise UserError("train", f"CUDA out of memory at step {step + 1}",
                            "Lower data.max_seq_len or train.batch_size, set train.chunked_ce=true, "
                            "train.gradient_checkpointing=true or train.optimizer=adamw8bit; "
                            "`finetune plan RECIPE` predicts what fits") from None
        finally:
            bar.close()
    acc.wait_for_everyone()
    adapter_dir = out / objective.saves_as
    full = gather_for_save(model, None) if is_sharded(model) else None
    if acc.is_main_process:
        metrics.flush()
        objective.save(unwrap_peft(model), adapter_dir, **_state(full))
        metrics.plot(out)
        _finish_data_stats(data, out)
    if is_sharded(model):
        main_log(f"adapter gathered from {acc.num_processes} shards (FSDP2)")
    elif acc.num_processes > 1:
        _check_ranks_agree(model, acc, out, main_log)
    acc.end_training()
    if acc.num_processes > 1 and torch.distributed.is_initialized():
        # Left to interpreter exit, gloo's threads can abort the process ("terminate called
        # without an active exception") after a successful run.
        torch.distributed.destroy_process_group()
    seconds = time.time() - t0
    return TrainResult(adapter_dir, losses, step, seconds, real_tokens / max(seconds, 1e-9))


# ---------------------------------------------------------------- setup


def _accelerator(t, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # find_unused_parameters: a batch without images (or audio) leaves those LoRA weights out of
    # the graph. `cpu` under torchrun: accelerate only starts gloo DDP when told it is on CPU.
    trackers = available_trackers(t.report_to)
    return Accelerator(cpu=_multi_process_cpu(), log_with=trackers or None, project_dir=str(out),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _prepare_data(recipe, processor, family, acc, out: Path, log):
    from data_tools.pipeline import prepare

    with acc.main_process_first():
        data = prepare(recipe, processor, recipe.model.base, chat=family.chat,
                       rejects_path=out / "rejects.jsonl", log=log)
    if acc.is_main_process:
        (out / "data_stats.json").write_text(json.dumps(data.stats, indent=1))
        dump_recipe(recipe, out / "recipe.lock.yaml")
    log(f"data: records that could not be used are listed in {out / 'rejects.jsonl'}")
    need = recipe.train.batch_size * acc.num_processes
    if not data.streaming and len(data.train) < need:
        total = data.stats["total"]
        raise UserError("datasets", f"{len(data.train)} usable training samples, fewer than one global batch "
                        f"({need}); {total['rejected']} of {total['records']} records were rejected "
                        f"{dict(total['rejected_by_reason']) or ''}",
                        f"See {out / 'rejects.jsonl'} (and `finetune data stats`), or lower train.batch_size")
    return data


def _finish_data_stats(data, out: Path) -> None:
    """A streamed run's accounting is complete only now: render the held-out records if nothing
    asked for them (their rejects belong in rejects.jsonl too), then write the stats again."""
    if data.streaming:
        len(data.eval)
        (out / "data_stats.json").write_text(json.dumps(data.stats, indent=1))


def _state(full: dict | None) -> dict:
    """`objective.save`'s keyword for a gathered (FSDP) adapter; nothing otherwise."""
    return {"state_dict": full["adapter"]} if full else {}


def _agreed(flag: bool, acc) -> bool:
    """Whether any process was asked to stop (all stop at the same step)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), reduction="sum") > 0)


def _postfix(row: dict) -> dict:
    shown = {k: f"{v:.4f}" for k, v in row.items() if k in ("loss", "eval_loss") or "/" in k}
    return shown | {"lr": f"{row['lr']:.2e}", "tok_s": f"{row['tokens_per_s']:.0f}"}


# ---------------------------------------------------------------- eval loss and previews


def eval_loss(model, objective, data, pad_id, dtype, device) -> dict:
    """Mean loss (per the objective's weight) on the eval set, overall and by sample modality.

    One sample per forward: the per-modality sums need per-sample losses, and the eval set
    is small. Runs on every rank (no gradients, so no DDP involvement; sharded, through the root
    module, which gathers the weights)."""
    peft_model = unwrap_peft(model)
    run = model if is_sharded(model) else peft_model
    sums: dict[str, list[float]] = {}
    peft_model.eval()
    with torch.no_grad():
        for j in range(len(data)):
            s = data[j]
            b = to_device(objective.collate([s], pad_id), device, dtype)
            ls, _ = forward_loss(run, objective, b)
            acc = sums.setdefault(s["modality"], [0.0, 0])
            acc[0] += float(ls)
            acc[1] += objective.weight(b)
    peft_model.train()
    out = {f"eval_loss_{m}": v[0] / max(1, v[1]) for m, v in sums.items()}
    out["eval_loss"] = sum(v[0] for v in sums.values()) / max(1, sum(v[1] for v in sums.values()))
    return out


def _preview(model, processor, chat, recipe, held_out, out: Path, step: int, log, acc) -> None:
    """Answers to the first held-out samples: console, previews.jsonl, tensorboard text."""
    from finetune.training.previews import preview_rows, write_previews

    rows = preview_rows(unwrap_peft(model), processor, chat, held_out, recipe.train.preview_items,
                        recipe.eval.max_new_tokens)
    writer = acc.get_tracker("tensorboard", unwrap=True) if "tensorboard" in recipe.train.report_to else None
    write_previews(rows, out, step, writer)
    for r in rows:
        log(f"preview step {step} [{r['id']}]: {r['output']!r} (reference {r['reference']!r})")


# ---------------------------------------------------------------- processes


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


def _cpu_threads(num_processes: int, log) -> None:
    if "OMP_NUM_THREADS" in os.environ:
        return
    n = cpu_threads_for(num_processes)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
        log(f"cpu: {n} torch thread(s) per process (set OMP_NUM_THREADS to choose)")


def _check_ranks_agree(model, acc, out: Path, log) -> None:
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
