"""KTO (Kahneman-Tversky optimisation): unpaired desirable/undesirable answers vs a reference.

Examples are `prompt`/`completion`/`label` records, or pairs taken apart as TRL's
`unpair_preference_dataset` does (a micro-batch of n pairs: the n chosen answers, desirable, then
the n rejected ones). Each example's reward is β·(log π − log π_ref) over its answer tokens; the
loss pulls desirable rewards above and undesirable ones below a KL baseline, estimated per
micro-batch from mismatched pairs (prompt i with the answer of example i−1, TRL's rotation),
detached and clamped at 0. The weight is the number of examples. Losses and metrics follow TRL
1.16's `KTOTrainer._compute_loss` (tests/objectives/test_preference.py); TRL also averages the KL estimate
over processes, here each process uses its own micro-batch's. With unpaired data give
`train.batch_size` >= 2: one example's mismatched row is itself (TRL refuses batch size 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_tools.collate import collate
from finetune.objectives.base import register
from finetune.objectives.preference import PairObjective, answer_row, reference_policy, sequence_logps, sides

KL = "kl_"  # prefix of the mismatched rows' keys in a KTO micro-batch


def examples_of(samples: list[dict]) -> list[tuple[dict, int, list[int], bool]]:
    """(sample, prompt length, answer ids, desirable) per example. Pairs come apart as TRL's
    `unpair_preference_dataset` takes a batch apart: every chosen answer, then every rejected one."""
    paired, unpaired = [], []
    for s in samples:
        start, answer, other = sides(s)
        if other is not None:
            paired.append(((s, start, answer, True), (s, start, other, False)))
        else:
            unpaired.append((s, start, answer, bool(s["desirable"])))
    return [c for c, _ in paired] + [r for _, r in paired] + unpaired


def kto_batch(samples: list[dict], pad_id: int) -> dict:
    """Examples → their rows, the mismatched KL rows (`kl_*`) and `desirable`."""
    examples = examples_of(samples)
    rows = [answer_row(s, start, a) for s, start, a, _ in examples]
    # Mismatched completions: example i's prompt (and media) with example i-1's answer, wrapping.
    kl_rows = [answer_row(s, start, examples[i - 1][2]) for i, (s, start, _, _) in enumerate(examples)]
    batch = collate(rows, pad_id, trim_tail=True)
    kl = collate(kl_rows, pad_id, trim_tail=True)
    batch.update({KL + k: kl[k] for k in ("input_ids", "labels", "mm_token_type_ids", "attention_mask")})
    batch["desirable"] = torch.tensor([good for *_, good in examples])
    return batch


@register("kto")
class KTO(PairObjective):
    """Desirable answers up, undesirable down, each against the reference and a KL baseline."""

    uses_reference = True
    metrics = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "kl")

    def __init__(self, recipe):
        super().__init__(recipe)
        p = recipe.preference
        self.desirable_weight, self.undesirable_weight = p.desirable_weight, p.undesirable_weight

    def collate(self, samples: list[dict], pad_id: int) -> dict:
        return kto_batch(samples, pad_id)

    def weight(self, batch: dict) -> int:
        return batch["input_ids"].shape[0]

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        with reference_policy(model):
            ref, _ = sequence_logps(model, batch, chunk_size=self.chunk_size)
            ref_kl, _ = sequence_logps(model, batch, prefix=KL, chunk_size=self.chunk_size)
        with torch.no_grad():  # the baseline is detached: only the examples' own terms train
            kl_logps, _ = sequence_logps(model, batch, prefix=KL, chunk_size=self.chunk_size)
        logps, _ = self.policy_logps(model, batch)
        kl = (kl_logps - ref_kl).mean().clamp(min=0)
        ratio = logps - ref
        good = batch["desirable"].to(ratio.device)
        losses = torch.where(good, self.desirable_weight * (1 - F.sigmoid(self.beta * (ratio - kl))),
                             self.undesirable_weight * (1 - F.sigmoid(self.beta * (kl - ratio))))
        return losses.sum(), self._metrics(self.beta * ratio.detach(), logps.detach(), good, kl)

    @staticmethod
    def _metrics(rewards, logps, good, kl) -> dict:
        """Sums the loop divides by the examples: group means (TRL's) scaled back by the count,
        so one micro-batch logs exactly TRL's numbers."""
        n = len(rewards)
        n_good, n_bad = int(good.sum()), int((~good).sum())

        def mean(x, sel, k):
            return x[sel].sum() / k if k else x.new_zeros(())

        out = {"rewards/chosen": mean(rewards, good, n_good) * n,
               "rewards/rejected": mean(rewards, ~good, n_bad) * n,
               "logps/chosen": mean(logps, good, n_good) * n,
               "logps/rejected": mean(logps, ~good, n_bad) * n,
               # on the right side of zero: desirable rewarded, undesirable penalised
               "rewards/accuracies": torch.where(good, rewards > 0, rewards < 0).float().sum(),
               "kl": kl.detach() * n}
        both = n_good and n_bad
        out["rewards/margins"] = (out["rewards/chosen"] - out["rewards/rejected"]) if both else rewards.new_zeros(())
        return out
