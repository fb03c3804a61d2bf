"""GRPO: TRL as the reference for the loss and its gradients, the rewards, the rollout rows,
exact resume, and the recipe's checks.

Parity: the same prompts (two of the demo's pictures, rendered by our pipeline), the same
completions, advantages, old and reference log-probabilities go through our loss and through
TRL 1.16's `GRPOTrainer.compute_loss`, on the one PEFT model TRL built (LoRA initialised away
from zero, so the policy differs from the reference), in float64. Loss and every LoRA gradient agree to
1e-5 for each normalisation (grpo, dr_grpo, dapo), with and without the KL term; the old
log-probs are shifted so that some ratios leave the clip range. TRL's chunked log-prob kernel
computes in fp32 whatever the model's dtype (`trl.kernels.chunked_logprob`), ours keeps float64:
TRL's fp32 rounding is the whole difference (measured: loss ≤ 1.5e-7, gradients ≤ 7.1e-6
absolute with the largest 6–12; in float32 on both sides it reached 2.8e-5).
"""

from __future__ import annotations

import pytest
import torch

from finetune.grpo.objective import completion_logps, group_advantages, policy_loss
from finetune.grpo.rollout import Group, rows

TOL = 1e-5
TEMPERATURE = 0.7
TRL_ARGS = {"use_cpu": True, "bf16": False, "report_to": []}  # fp32 (see tests/objectives/test_preference.py)


def image_prompts(demo_data, tiny_base, processor, tmp):
    """Two served image prompts of one length (TRL derives positions from none, we from the mask)."""
    from data_tools.pipeline import prepare
    from finetune.config.recipe import recipe_from_dict
    from finetune.drafter.unrolling import served_prompts
    from finetune.model.families import GEMMA4_UNIFIED

    r = recipe_from_dict({"model": {"base": str(tiny_base), "quantization": "none"},
                          "datasets": [{"path": str(demo_data / "train_image.jsonl")}],
                          "data": {"image_tokens": 70, "max_seq_len": 256, "cache_dir": str(tmp / "cache")},
                          "train": {"output_dir": str(tmp / "out")}})
    (tmp / "out").mkdir(exist_ok=True)
    data = prepare(r, processor, r.model.base, chat=GEMMA4_UNIFIED.chat, rejects_path=tmp / "out" / "rejects.jsonl",
                   use_cache=False)
    prompts = [served_prompts([data.train[i]], processor.tokenizer.pad_token_id) for i in range(len(data.train))]
    n = prompts[0]["input_ids"].shape[1]
    same = [p for p in prompts if p["input_ids"].shape[1] == n][:2]
    assert len(same) == 2
    return same


def completions(processor) -> list[Group]:
    """Two completions per prompt, of different lengths (one cut short by max_new_tokens)."""
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<turn|>")
    texts = [["red", "blue and green"], ["a purple picture, surely", "pink"]]
    groups = []
    for pair in texts:
        ids = [tok.encode(t, add_special_tokens=False) + [end] for t in pair]
        ids[0] = ids[0][:6]
        width = max(len(i) for i in ids)
        t = torch.full((2, width), tok.pad_token_id)
        m = torch.zeros((2, width), dtype=torch.long)
        for k, i in enumerate(ids):
            t[k, :len(i)], m[k, :len(i)] = torch.tensor(i), 1
        groups.append(Group(t, m, 0))
    return groups


def trl_trainer(tiny_base, processor, tmp, loss_type, beta, max_new_tokens):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from finetune.model.load import load_base

    torch.manual_seed(0)
    args = GRPOConfig(output_dir=str(tmp / "trl"), **TRL_ARGS, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=max_new_tokens, temperature=TEMPERATURE, beta=beta, loss_type=loss_type,
                      epsilon=0.2, epsilon_high=0.28, gradient_checkpointing=False, seed=0)
    trl = GRPOTrainer(model=load_base(str(tiny_base), device="cpu"), args=args,
                      reward_funcs=lambda prompts, completions, **_: [0.0] * len(prompts),
                      train_dataset=Dataset.from_list([{"prompt": "Hi?"}] * 4), processing_class=processor,
                      peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    trl.current_gradient_accumulation_steps = 1  # set by Trainer.training_step, which we skip
    return trl


def lora_grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.0), ("grpo", 0.04), ("dr_grpo", 0.04), ("dapo", 0.0)])
def test_loss_and_gradients_equal_trl(demo_data, tiny_base, processor, tmp_path, loss_type, beta):
    pytest.importorskip("trl")
    max_new = 6
    prompts = image_prompts(demo_data, tiny_base, processor, tmp_path)
    groups = completions(processor)
    batch = rows(prompts, groups, processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 4  # each completion row carries its prompt's picture
    trl = trl_trainer(tiny_base, processor, tmp_path, loss_type, beta, max_new)
    model = trl.model.double()
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    mask = batch["completion_mask"]
    with torch.no_grad():
        current = completion_logps(model, batch, TEMPERATURE)
        with model.disable_adapter():
            ref = completion_logps(model, batch, TEMPERATURE)
    gen = torch.Generator().manual_seed(1)
    old = (current + 1.0 * (torch.rand(current.shape, generator=gen) - 0.5)) * mask  # some ratios leave [0.8, 1.28]
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.25, 0.75], dtype=torch.float64), 2, "group")

    logps = completion_logps(model, batch, TEMPERATURE)
    total, clipped, _ = policy_loss(logps, old, adv, mask, eps_low=0.2, eps_high=0.28, beta=beta, ref=ref,
                                    loss_type=loss_type, max_new_tokens=max_new)
    weight = int(mask.sum()) if loss_type == "dapo" else mask.shape[0]
    ours = total / weight
    ours.backward()
    g_ours = lora_grads(model)
    assert 0 < int((clipped & mask.bool()).sum()) < int(mask.sum())

    p = batch["prompt_len"]
    inputs = {"prompt_ids": batch["input_ids"][:, :p], "prompt_mask": batch["attention_mask"][:, :p],
              "completion_ids": batch["completion_ids"], "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum(),
              "pixel_values": batch["pixel_values"], "image_position_ids": batch["image_position_ids"],
              "num_images": [1] * 4, "mm_token_type_ids": batch["mm_token_type_ids"]}
    theirs = trl.compute_loss(model, inputs)
    theirs.backward()
    g_theirs = lora_grads(model)
    assert abs(float(ours.detach()) - float(theirs.detach())) <= TOL, (float(ours), float(theirs))
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) > 10
    worst = max(float((g_ours[k] - g_theirs[k]).abs().max()) for k in g_ours)
    scale = max(float(g.abs().max()) for g in g_ours.values())
    assert worst <= TOL, (worst, scale)
    assert scale > 1e-2  # the gradients are not all ~0
