"""Preference tuning on the shared engine: DPO (sigmoid and IPO losses) and ORPO; KTO in `kto`.

A micro-batch of `n` pairs is 2n rows: the chosen answers, then the rejected ones, each after
the same served prompt with its media (`data_tools.preference` renders both sides). Log-
probabilities are summed over answer tokens only, through `finetune.objectives.losses.chunked_logps`: the
vocabulary logits exist one chunk of answer positions at a time, never for a whole sequence.

The reference policy (DPO, KTO) is the base with the adapter switched off (PEFT's
`disable_adapter`), so no second model sits in memory; or, with `train.reference_adapter`, that
adapter loaded a second time as a frozen PEFT adapter named `ref` while its first copy trains
(the usual DPO-after-SFT flow, and TRL's name). The reference pass runs first, without grad
and in eval mode (no dropout), so its activations are gone before the policy's forward.

Losses and metrics follow TRL 1.16 (`DPOTrainer._compute_loss`, the experimental
`ORPOTrainer`), checked against them in tests/objectives/test_preference.py. The weight is the number of
pairs: a step's loss is the mean over the pairs of its whole accumulation window. NLL terms
(ORPO's, and DPO's optional `preference.sft_weight`) are the chosen answer's mean token NLL per
pair; TRL averages them over all the batch's chosen tokens instead (and its ORPO trainer also
counts the prompt's), which agrees with ours for one pair per batch.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from data_tools.collate import collate
from data_tools.preference import answer_span
from data_tools.render import IGNORE
from finetune.errors import UserError
from finetune.model.load import unwrap
from finetune.model.memory_tricks import offload_activations, offload_mode
from finetune.objectives.base import Objective, register
from finetune.objectives.losses import chunked_logps

REFERENCE = "ref"  # the PEFT adapter name of `train.reference_adapter` (TRL uses the same)
TRAINED = "default"  # PEFT's name for the adapter that trains
MEDIA = ("pixel_values", "image_position_ids", "input_features")
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected")


# ---------------------------------------------------------------- micro-batches


def answer_row(sample: dict, start: int, answer: list[int]) -> dict:
    """`sample`'s prompt (its first `start` tokens and its media) followed by `answer`."""
    row = {"input_ids": list(sample["input_ids"][:start]) + list(answer),
           "labels": [IGNORE] * start + list(answer),
           "mm_token_type_ids": list(sample["mm_token_type_ids"][:start]) + [0] * len(answer)}
    row.update({k: sample[k] for k in MEDIA if k in sample})
    return row


def sides(sample: dict) -> tuple[int, list[int], list[int] | None]:
    """(prompt length, chosen answer ids, rejected answer ids or None) of a preference sample."""
    start, stop = answer_span(sample["labels"])
    rejected = sample.get("rejected_ids")
    return start, list(sample["input_ids"][start:stop]), (list(rejected) if rejected is not None and
                                                          len(rejected) else None)


def pair_batch(samples: list[dict], pad_id: int) -> dict:
    """n pairs → 2n rows: chosen 0..n-1, then rejected 0..n-1 (the media of row i and n+i agree)."""
    chosen, rejected = [], []
    for s in samples:
        start, c, r = sides(s)
        if r is None:
            raise UserError(s.get("origin", "data"), "an unpaired (prompt/completion/label) record in "
                            "pair training", "Give dpo and orpo prompt/chosen/rejected pairs, or use "
                            "train.objective kto")
        chosen.append(answer_row(s, start, c))
        rejected.append(answer_row(s, start, r))
    return collate(chosen + rejected, pad_id, trim_tail=True)


def model_inputs(batch: dict, prefix: str = "") -> dict:
    """The model's keyword arguments for the rows under `prefix` (media are shared)."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "position_ids")
    out = {k: batch[prefix + k] for k in keys if prefix + k in batch}
    out.update({k: batch[k] for k in (*MEDIA, "input_features_mask") if k in batch})
    return out


# ---------------------------------------------------------------- log-probabilities


def sequence_logps(model, batch: dict, *, prefix: str = "", chunk_size: int | None = None,
                   offload: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's answer tokens, answer tokens per row) under `model`."""
    cg = unwrap(model)
    with offload_activations(offload):
        hidden = cg.model(**model_inputs(batch, prefix), use_cache=False).last_hidden_state
    cap = cg.config.get_text_config().final_logit_softcapping
    return chunked_logps(hidden, batch[prefix + "labels"], cg.lm_head.weight, cap, chunk_size)


@contextlib.contextmanager
def reference_policy(model):
    """Inside: `model` is the reference policy (no grad, eval mode): the reference adapter when
    one is loaded, else the base with the adapter switched off."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if REFERENCE in getattr(model, "peft_config", {}):
                active = model.active_adapter
                model.set_adapter(REFERENCE, inference_mode=True)
                try:
                    yield
                finally:
                    model.set_adapter(active)  # trainable again (PEFT's default)
            else:
                with model.disable_adapter():
                    yield
    finally:
        model.train(was_training)


def start_from_adapter(model, recipe, reference: bool = True):
    """`train.reference_adapter` on the base, trainable (in fp32 over any base, as `attach_lora`
    trains); with `reference`, loaded a second time, frozen, as the adapter named `ref`."""
    from finetune.model.adapters import load_adapter, open_adapter

    path, m = recipe.train.reference_adapter, recipe.model
    open_adapter(path, base=m.base, allow_pickle=m.allow_pickle)  # the adapter fits this base
    peft = load_adapter(model, path, is_trainable=True, allow_pickle=m.allow_pickle)
    if reference:
        peft.load_adapter(path, adapter_name=REFERENCE, is_trainable=False)
        peft.set_adapter(TRAINED)
    for p in peft.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft


def reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """Sums over pairs (the loop divides by the window's pairs): TRL's reward metrics."""
    margins = chosen_rewards - rejected_rewards
    values = (chosen_rewards, rejected_rewards, (margins > 0).float(), margins, chosen_logps, rejected_logps)
    return {k: v.detach().sum() for k, v in zip(REWARD_METRICS, values)}


# ---------------------------------------------------------------- the objectives


class PairObjective(Objective):
    """What DPO and ORPO share: pairs in, the pair count as weight, the PEFT adapter saved."""

    formats = ("preference",)
    packs = False  # rows come in chosen/rejected pairs: `collate` makes them
    rows_per_sample = 2  # what `finetune plan` counts per sample
    uses_reference = False
    metrics = REWARD_METRICS

    def __init__(self, recipe):
        super().__init__(recipe)
        t, p = recipe.train, recipe.preference
        self.beta = p.beta
        self.chunk_size = t.ce_chunk_size
        self.offload = offload_mode(t)

    def collate(self, samples: list[dict], pad_id: int) -> dict:
        return pair_batch(samples, pad_id)

    def weight(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def policy_logps(self, model, batch: dict, prefix: str = ""):
        return sequence_logps(model, batch, prefix=prefix, chunk_size=self.chunk_size, offload=self.offload)

    def setup(self, model, family):
        """The recipe's LoRA; with `train.reference_adapter`, that adapter twice: trainable, and
        frozen as the reference."""
        if not self.recipe.train.reference_adapter:
            return super().setup(model, family)
        return start_from_adapter(model, self.recipe)

    def save(self, model, out, state_dict: dict | None = None, objective_state: dict | None = None) -> None:
        """Only the trained adapter: the reference is the folder it came from."""
        model.save_pretrained(out, selected_adapters=[TRAINED], state_dict=state_dict)


@register("dpo")
class DPO(PairObjective):
    """Direct preference optimisation against a frozen reference (sigmoid or IPO loss)."""

    uses_reference = True

    def __init__(self, recipe):
        super().__init__(recipe)
        self.loss_type = recipe.preference.loss_type
        self.sft_weight = recipe.preference.sft_weight

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        n = self.weight(batch)
        with reference_policy(model):
            ref, _ = sequence_logps(model, batch, chunk_size=self.chunk_size)
        logps, tokens = self.policy_logps(model, batch)
        chosen_ratio, rejected_ratio = logps[:n] - ref[:n], logps[n:] - ref[n:]
        if self.loss_type == "ipo":
            # IPO on per-token log-ratios, as TRL computes it (confirmed with the IPO authors there)
            delta = chosen_ratio / tokens[:n].clamp(min=1) - rejected_ratio / tokens[n:].clamp(min=1)
            losses = (delta - 1 / (2 * self.beta)) ** 2
        else:
            losses = -F.logsigmoid(self.beta * (chosen_ratio - rejected_ratio))
        metrics = reward_metrics(self.beta * chosen_ratio, self.beta * rejected_ratio, logps[:n], logps[n:])
        if self.sft_weight:
            # The chosen answer's NLL keeps its likelihood rising (plain DPO may lower both sides).
            nll = -logps[:n] / tokens[:n].clamp(min=1)
            losses = losses + self.sft_weight * nll
            metrics["nll_loss"] = nll.detach().sum()
        return losses.sum(), metrics


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register("orpo")
class ORPO(PairObjective):
    """Odds-ratio preference optimisation: the chosen answer's NLL minus λ·log σ(log odds ratio);
    no reference policy."""

    metrics = REWARD_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        n = self.weight(batch)
        logps, tokens = self.policy_logps(model, batch)
        mean = logps / tokens.clamp(min=1)  # ORPO works on per-token averages
        c, r = mean[:n], mean[n:]
        log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
        ratio = F.logsigmoid(log_odds)
        nll = -c
        metrics = reward_metrics(self.beta * c, self.beta * r, c, r)
        metrics.update({"nll_loss": nll.detach().sum(), "log_odds_ratio": ratio.detach().sum(),
                        "log_odds_chosen": log_odds.detach().sum()})
        return (nll - self.beta * ratio).sum(), metrics
