"""`finetune train`: the explicit loop on `accelerate.Accelerator`, shared by every objective.

Why not transformers' Trainer: see ARCHITECTURE.md, "Why our own loop". In short, it builds
full-vocabulary logits for every position and normalises accumulation per micro-batch, both
wrong for this model, and fixing either means patching its internals.

`train()` reads as its steps, in the style of torchtune's recipes: set up the data, the model,
the optimizer, resume; then each step is `_train_step`, `_maybe_eval`, `_maybe_preview`,
`_maybe_checkpoint`; `_finish` saves what was trained. One optimizer step = `grad_accum`
micro-batches per process, normalised by the objective's weight over the whole window
(finetune.training.step). Every `save_every` steps and at the end a checkpoint is written
(finetune.training.checkpoint), so `--resume` continues exactly, also past the end with a
larger `train.max_steps`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.config.recipe import Recipe, dump_recipe
from finetune.errors import TrainingStopped, UserError
from finetune.model.attention import STOCK as STOCK_ATTENTION
from finetune.model.attention import set_attention
from finetune.model.load import unwrap
from finetune.model.memory_tricks import tile_mlp
from finetune.model.tiled_attention import tile_attention
from finetune.plan.checks import sharding_problems
from finetune.training.batches import BatchPlan, StreamPlan, branch_aware
from finetune.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from finetune.training.evaluation import eval_loss, preview
from finetune.training.metrics import EvalWatch, MetricsLog
from finetune.training.optim import make_optimizer, make_scheduler
from finetune.training.processes import accelerator, check_ranks_agree, set_cpu_threads
from finetune.training.resume import StopRequest, check_resume
from finetune.training.sharding import describe, fsdp_plugin, gather_for_save, is_sharded, shard
from finetune.training.step import optimizer_step
from finetune.training.wrappers import LossForward, to_device


@dataclass
class TrainResult:
    adapter_dir: Path
    losses: list[float]
    steps: int
    seconds: float
    tokens_per_s: float


def _silent(*_):
    pass


def train(recipe: Recipe, *, resume: bool = False, force: bool = False, log=None,
          progress: bool | None = None) -> TrainResult:
    """Train `recipe`'s objective; `log` receives progress lines (None: silent), `progress` shows a
    bar (default: when `log` is given). A resumed run must have the base and data it began with
    (`finetune.model.provenance`; `force` logs a mismatch instead of refusing)."""
    from finetune.model import provenance

    run = _Run(recipe, log, progress)
    run.resuming = resume
    if resume:
        check_resume(recipe, run.out, run.log)
        provenance.check_resume(recipe, run.out, force=force, log=run.log)
    run.fsdp = fsdp_plugin()  # `accelerate launch` with configs/accelerate/fsdp2.yaml
    if run.fsdp is not None:
        sharding_problems(recipe)
    run.out.mkdir(parents=True, exist_ok=True)
    run.setup_processes()
    run.setup_data()
    run.setup_model()
    run.setup_optimizer()
    if resume:
        run.resume()
    return run.loop()


class _Run:
    """The state of one training run, built by the setup steps and advanced by the loop's."""

    def __init__(self, recipe: Recipe, log, progress: bool | None):
        self.recipe, self.t = recipe, recipe.train
        self.progress = log is not None if progress is None else progress
        self.log = log or _silent
        self.out = Path(self.t.output_dir)
        self.step, self.position = 0, 0
        self.resuming = False

    # ------------------------------------------------------------ setup steps

    def setup_processes(self) -> None:
        from accelerate.utils import set_seed

        self.acc = accelerator(self.t, self.out)
        self.main_log = self.log if self.acc.is_main_process else _silent
        if self.acc.device.type == "cpu":
            set_cpu_threads(self.acc.num_processes, self.main_log)
        set_seed(self.t.seed)

    def setup_data(self) -> None:
        from data_tools.pipeline import prepare
        from finetune.model.load import base_family, load_processor

        r, acc = self.recipe, self.acc
        self.family = base_family(r.model.base, r.model.trust_remote_code)
        self.processor = load_processor(r.model.base, r.data.image_tokens, r.model.trust_remote_code)
        with acc.main_process_first():
            data = prepare(r, self.processor, r.model.base, chat=self.family.chat,
                           rejects_path=self.out / "rejects.jsonl", log=self.main_log)
        if acc.is_main_process:
            from finetune.model import provenance

            (self.out / "data_stats.json").write_text(json.dumps(data.stats, indent=1))
            dump_recipe(r, self.out / "recipe.lock.yaml")
            if not (self.resuming and provenance.read(self.out)):  # what the run began with
                provenance.write(self.out, provenance.of_recipe(r))
        self.main_log(f"data: records that could not be used are listed in {self.out / 'rejects.jsonl'}")
        need = self.t.batch_size * acc.num_processes
        if not data.streaming and len(data.train) < need:
            total = data.stats["total"]
            raise UserError("datasets", f"{len(data.train)} usable training samples, fewer than one global batch "
                            f"({need}); {total['rejected']} of {total['records']} records were rejected "
                            f"{dict(total['rejected_by_reason']) or ''}",
                            f"See {self.out / 'rejects.jsonl'} (and `finetune data stats`), or lower train.batch_size")
        self.data = data

    def _choose_mlp_tile(self) -> None:
        from finetune.plan.tiles import resolved
        from finetune.training.processes import free_memory_gib

        acc = self.acc
        self.recipe, line = resolved(self.recipe, free_memory_gib(acc.device), device=acc.device.type,
                                     gpus=acc.num_processes, strategy="fsdp" if self.fsdp is not None else "ddp")
        self.t = self.recipe.train
        self.main_log(line)

    def setup_model(self) -> None:
        from accelerate.utils import set_seed

        from finetune import objectives
        from finetune.model.load import enable_gradient_checkpointing, load_recipe_base
        from finetune.model.lora import format_table, trainable_table

        if self.t.mlp_tile_tokens == "auto":  # chosen from the memory free before the base loads
            self._choose_mlp_tile()
        r, t, acc = self.recipe, self.t, self.acc
        model = load_recipe_base(r.model, acc.device.type)
        self.pad_id = self.processor.tokenizer.pad_token_id
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.objective = objectives.build(r)
        self.plan = self._batch_plan(model.config.get_text_config())
        set_seed(t.seed)  # LoRA init is seeded the same whatever loading consumed
        model = self.objective.setup(model, self.family)
        if t.mlp_tile_tokens:
            tile_mlp(model, t.mlp_tile_tokens, self.family.mlp_blocks)
        if t.attention != STOCK_ATTENTION:
            set_attention(model, t.attention, t.attention_block_rows)
        if t.tile_attention:
            tile_attention(model, t.attention_block_rows, self.family.attention_blocks)
        if self.objective.trains_model:
            self.main_log("trainable parameters by part:\n" + format_table(trainable_table(model, self.family)))
        model.train()
        dtype = unwrap(model).model.language_model.embed_tokens.weight.dtype
        self.cdtype = (torch.float32 if acc.device.type == "cpu"
                       else (torch.bfloat16 if r.model.dtype == "auto" else dtype))
        self.model = model

    def _batch_plan(self, text_cfg):
        """The order of micro-batches; with `train.epochs`, the step count it implies."""
        t, acc, o = self.t, self.acc, self.objective
        collate = branch_aware(o.collate, o.pack if o.packs else None, text_cfg)
        if self.data.streaming:
            return StreamPlan(self.data.train, t, self.pad_id, acc.num_processes, acc.process_index, collate)
        plan = BatchPlan(self.data.train, t, self.pad_id, text_cfg, acc.num_processes, acc.process_index,
                         self.recipe.data.max_seq_len, collate, o.pack)
        if t.epochs is not None:  # known only now: the batches an epoch makes
            steps = max(1, math.ceil(t.epochs * plan.batches_per_epoch() / t.grad_accum))
            self.t = plan.t = dataclasses.replace(t, max_steps=steps)
            self.main_log(f"train: {t.epochs:g} epoch(s) of {plan.batches_per_epoch()} micro-batches = {steps} steps")
        return plan

    def setup_optimizer(self) -> None:
        device = self.acc.device.type
        if self.fsdp is not None:  # sharded first: the optimizer holds (and its state follows) the shards
            self.model = LossForward(self.model, self.objective)
            shard(self.model, self.fsdp, unwrap(self.model)._no_split_modules)
            self.objective.__dict__["root"] = self.model
            self.main_log(describe(self.model))
            self.optimizer = make_optimizer(self.model.parameters(), self.t, device)
        else:  # weights the objective owns (a drafter) train with the model's
            optimizer = make_optimizer([*self.model.parameters(), *self.objective.parameters()], self.t, device)
            self.model, self.optimizer = self.acc.prepare(LossForward(self.model, self.objective), optimizer)
        self.scheduler = make_scheduler(self.optimizer, self.t)

    def resume(self) -> None:
        ck = latest_checkpoint(self.out)
        if ck is None:
            self.main_log(f"resume: no complete checkpoint in {self.out / 'checkpoints'}, starting fresh")
            return
        self.step, self.position = load_checkpoint(ck, self.model, self.optimizer, self.scheduler)
        self.main_log(f"resume: continuing from {ck} (step {self.step})")

    # ------------------------------------------------------------ the loop

    def loop(self) -> TrainResult:
        from tqdm import tqdm

        t, acc = self.t, self.acc
        if acc.is_main_process:
            acc.init_trackers("finetune", config={"lr": t.lr, "r": self.recipe.lora.r, "batch_size": t.batch_size})
        self.metrics = MetricsLog(self.out, acc, resume_step=self.step, every=t.log_every)
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.progress and acc.is_main_process))
        self.t0, self.real_tokens, self.losses = time.time(), 0, []
        self.watch = EvalWatch(t.early_stopping_patience)
        with StopRequest() as stop:
            try:
                while self.step < t.max_steps:
                    row = self._train_step()
                    early_stop = self._maybe_eval(row)
                    self.metrics.write(row)
                    self._maybe_preview()
                    bar.set_postfix(_postfix(row))
                    bar.update(1)
                    stopping = _agreed(stop.requested, acc)
                    self._maybe_checkpoint(force=stopping or early_stop)
                    if stopping and self.step < t.max_steps:
                        raise TrainingStopped(self.step, self.out / "checkpoints" / f"step-{self.step}")
                    if early_stop:
                        break
            except torch.cuda.OutOfMemoryError:
                raise UserError("train", f"CUDA out of memory at step {self.step + 1}",
                                "Lower data.max_seq_len or train.batch_size, set train.chunked_ce=true, "
                                "train.gradient_checkpointing=true or train.optimizer=adamw8bit; "
                                "`finetune plan RECIPE` predicts what fits") from None
            finally:
                bar.close()
        return self._finish()

    def _train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches; its metrics row."""
        t, acc = self.t, self.acc
        micro = [to_device(self.plan.micro_batch(self.position + i), acc.device, self.cdtype)
                 for i in range(t.grad_accum)]
        loss, weight, values = optimizer_step(self.model, self.optimizer, self.scheduler, micro, acc,
                                              self.objective, t.max_grad_norm)
        self.step += 1
        if self.step % self.objective.steps_per_batch == 0:  # else the same window again (GRPO iterations)
            self.position += t.grad_accum
        self.real_tokens += sum(int(b["input_ids"].ne(self.pad_id).sum()) for b in micro) * acc.num_processes
        self.losses.append(loss)
        elapsed = time.time() - self.t0
        return {"step": self.step, "loss": loss, **values, "lr": self.scheduler.get_last_lr()[0], "tokens": weight,
                "tokens_per_s": self.real_tokens / max(1e-9, elapsed), "elapsed": elapsed}

    def _maybe_eval(self, row: dict) -> bool:
        """The eval loss every `eval_every` steps (into `row`), the best adapter kept; whether to
        stop early."""
        t, step = self.t, self.step
        if not (t.eval_every and step % t.eval_every == 0 and len(self.data.eval)):
            return False
        row.update(eval_loss(self.model, self.objective, self.data.eval, self.pad_id, self.cdtype, self.acc.device))
        improved, early_stop = self.watch.update(step, row["eval_loss"])
        if improved and t.keep_best:
            self._save_trained(self.out / "best")
            if self.acc.is_main_process:
                (self.out / "best" / "best.json").write_text(json.dumps({"step": step, "eval_loss": row["eval_loss"]}))
        w = self.watch
        self.main_log(f"step {step}: eval_loss {row['eval_loss']:.4f} (best {w.best:.4f} at step {w.best_step})"
                      + (f"; no better for {w.since} evals: stopping early" if early_stop else ""))
        return early_stop

    def _maybe_preview(self) -> None:
        t = self.t
        if t.preview_every and self.step % t.preview_every == 0 and self.acc.is_main_process \
                and self.objective.previews:
            preview(self.model, self.processor, self.family.chat, self.recipe, self.data.eval, self.out, self.step,
                    self.main_log, self.acc)

    def _maybe_checkpoint(self, force: bool = False) -> None:
        """Every `save_every` steps, at the last step, and when stopping (`force`)."""
        t = self.t
        if not ((t.save_every and self.step % t.save_every == 0) or self.step == t.max_steps or force):
            return
        self.acc.wait_for_everyone()
        full = gather_for_save(self.model, self.optimizer) if is_sharded(self.model) else None  # every rank
        if self.acc.is_main_process:
            self.metrics.flush()
            save_checkpoint(self.out, self.step, self.model, self.optimizer, self.scheduler, self.position,
                            t.keep_checkpoints, full=full)

    def _save_trained(self, folder: Path) -> None:
        """`objective.save` on the main process; a sharded adapter is gathered whole first (every rank)."""
        full = gather_for_save(self.model, None) if is_sharded(self.model) else None
        if self.acc.is_main_process:
            gathered = {"state_dict": full["adapter"], "objective_state": full["objective"]} if full else {}
            self.objective.save(unwrap(self.model, peft=True), folder, **gathered)
            _keep_provenance(self.out, folder)

    def _finish(self) -> TrainResult:
        """Save what was trained (main process), check the ranks agree, close the processes."""
        acc = self.acc
        acc.wait_for_everyone()
        adapter_dir = self.out / self.objective.saves_as
        if acc.is_main_process:
            self._finish_data_stats()  # a streamed run's yield rule, before an adapter is saved
        self._save_trained(adapter_dir)
        if acc.is_main_process:
            self.metrics.flush()
            self.metrics.plot(self.out)
        if is_sharded(self.model):
            self.main_log(f"adapter gathered from {acc.num_processes} shards (FSDP2)")
        elif acc.num_processes > 1:
            check_ranks_agree(self.model, acc, self.out, self.main_log)
        acc.end_training()
        if acc.num_processes > 1 and torch.distributed.is_initialized():
            # Left to interpreter exit, gloo's threads can abort the process ("terminate called
            # without an active exception") after a successful run; and one rank tearing its
            # connections down while the other still finishes the last collective aborted it too
            # (once in a CI run of the drafter's two-process test): every rank gets here first.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        seconds = time.time() - self.t0
        return TrainResult(adapter_dir, self.losses, self.step, seconds, self.real_tokens / max(seconds, 1e-9))

    def _finish_data_stats(self) -> None:
        """A streamed run's accounting is complete only now: render the held-out records if nothing
        asked for them (their rejects belong in rejects.jsonl too), write the stats again, and
        hold them to the yield rule before an adapter is saved as if all went well."""
        if self.data.streaming:
            from data_tools.accounting import check_yield

            self.data.render_eval()
            (self.out / "data_stats.json").write_text(json.dumps(self.data.stats, indent=1))
            if self.data.stats.get("complete", True):
                check_yield(self.data.stats, self.recipe.data.max_rejected_fraction, str(self.out / "rejects.jsonl"))


def _keep_provenance(out: Path, folder: Path) -> None:
    """The run's provenance.json (base and data) goes with every adapter it saves."""
    import shutil

    from finetune.model.provenance import FILE

    if (out / FILE).is_file() and folder.is_dir() and folder.resolve() != out.resolve():  # a drafter saves in out
        shutil.copyfile(out / FILE, folder / FILE)


def _agreed(flag: bool, acc) -> bool:
    """Whether any process was asked to stop (all stop at the same step)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), reduction="sum") > 0)


def _postfix(row: dict) -> dict:
    shown = {k: f"{v:.4f}" for k, v in row.items() if k in ("loss", "eval_loss") or "/" in k}
    return shown | {"lr": f"{row['lr']:.2e}", "tok_s": f"{row['tokens_per_s']:.0f}"}
