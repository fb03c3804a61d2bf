"""The peers, on the same model and data as ours in the GPU run: HF `Trainer` + PEFT (one sample
a step, or rows the user pre-packed), TRL `SFTTrainer` with `padding_free`, and why unsloth is
not in the run."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.gpu_steps import _fresh, _memory, _sync
from data_tools.collate import collate

# unsloth 2026.10.9 (PyPI, checked for this run): its wheel alone is 28.6 MB (+ unsloth_zoo 2.9 MB,
# xformers, diffusers, datasets, tyro), over what the 64 MiB carry leaves after transformers,
# peft, bitsandbytes and trl (~58 MiB); and it pins transformers <= 5.17.0 and trl <= 1.15.0,
# while gemma4_unified training here needs transformers 5.24.
UNSLOTH = {"skipped": "not installable offline within the carry limit",
           "why": "unsloth 2026.10.9 wheel 28.6 MB + unsloth_zoo 2.9 MB + xformers/diffusers/datasets/tyro on top "
                  "of transformers 13.5 + peft 0.8 + bitsandbytes 43.1 + trl 0.9 MB exceeds the device tool's "
                  "64 MiB carry; it also requires transformers<=5.17.0 and trl<=1.15.0 (this run: 5.24.0, 1.16.0)"}


def step_clock(device: str):
    """A Trainer callback timing each optimizer step (synchronised), into its `times`."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            self.times.append(time.perf_counter() - self.t0)

    return Clock()


def run_hf(model, samples: list[dict], pad_id: int, device: str, dtype, tmp: Path,
           real_tokens: list[int] | None = None) -> dict:
    """HF `Trainer` + PEFT on the same model, one row per step (its default loss: full logits).

    `samples` are rows as the user hands them: one sample each, or several joined (pre-packed).
    Tokens/s counts the real tokens (labels or ids that are not padding) of the timed steps."""
    from transformers import Trainer, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return samples[i]

    def collator(rows):  # pixels and audio frames in the compute dtype: bnb's embedder can't cast
        return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
                for k, v in collate(rows, pad_id).items()}

    clock = step_clock(device)
    times = clock.times

    class Args(TrainingArguments):
        @property
        def place_model_on_device(self):  # the documented hook: the model is on its device already
            return False

    args = Args(
        output_dir=str(tmp / "hf"), per_device_train_batch_size=1, max_steps=len(samples), learning_rate=1e-4,
        # No autocast (bf16=False): the model computes in bf16 with fp32 LoRA as ours does, and
        # accelerate's process-wide state already holds mixed_precision "no" from our runs.
        optim="adamw_bnb_8bit" if device == "cuda" else "adamw_torch", bf16=False,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=device == "cpu", report_to=[], save_strategy="no", logging_steps=10**6,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        train_sampling_strategy="sequential")
    _fresh(device)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collator, callbacks=[clock])
    trainer.train()
    tokens = sum(real_tokens[1:]) if real_tokens else sum(len(s["input_ids"]) for s in samples[1:])
    out = {**_memory(device), "tokens_per_s": round(tokens / sum(times[1:]), 1),
           "step_seconds": round(sum(times[1:]) / len(times[1:]), 3)}
    del trainer
    for p in model.parameters():
        p.grad = None
    _fresh(device)
    return out


def run_trl(model, samples: list[dict], pad_id: int, seq_len: int, device: str, tmp: Path) -> dict:
    """TRL `SFTTrainer`, `padding_free=True` with its best-fit packing into `seq_len` rows, on the
    text samples (its padding-free collator carries input ids and labels only: no media). The
    model sees packed position ids and no mask; transformers turns them into per-sample masks."""
    try:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
    except Exception as e:  # noqa: BLE001 - recorded: the peer is optional on the GPU machine
        return {"skipped": f"trl not importable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    from transformers import PreTrainedTokenizerFast

    clock = step_clock(device)
    times = clock.times

    # TRL wants a tokenizer for its pad token only: the rows are token ids already
    tok = PreTrainedTokenizerFast(tokenizer_object=_word_level(pad_id), pad_token="<pad>")
    rows = Dataset.from_list([{"input_ids": list(s["input_ids"]), "labels": list(s["labels"])} for s in samples])
    lora = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    args = SFTConfig(
        output_dir=str(tmp / "trl"), per_device_train_batch_size=1, max_steps=-1, num_train_epochs=1,
        learning_rate=1e-4, padding_free=True, packing=True, packing_strategy="bfd", max_length=seq_len,
        optim="adamw_bnb_8bit" if device == "cuda" else "adamw_torch", bf16=False,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=device == "cpu", report_to=[], save_strategy="no", logging_steps=10**6,
        dataloader_num_workers=0, disable_tqdm=True, dataset_kwargs={"skip_prepare_dataset": False})
    _fresh(device)
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok, callbacks=[clock])
        packed = [len(r["input_ids"]) for r in trainer.train_dataset]
        trainer.train()
        out = {**_memory(device), "rows": len(packed),
               "tokens_per_s": round(sum(packed[1:]) / sum(times[1:]), 1) if len(times) > 1 else None,
               "step_seconds": round(sum(times[1:]) / max(len(times) - 1, 1), 3)}
        del trainer
    finally:
        # TRL casts a quantized model's trainable weights to bf16: ours train in fp32
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in lora:
                    p.data = p.data.to(lora[n])
                    p.grad = None
        _fresh(device)
    return out


def _word_level(pad_id: int):
    """A one-token vocabulary tokenizer whose pad token has id `pad_id` (TRL reads only that)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {f"<unused{i}>": i for i in range(pad_id)}
    vocab["<pad>"] = pad_id
    return Tokenizer(WordLevel(vocab, unk_token="<pad>"))
