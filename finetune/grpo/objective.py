"""GRPO on the shared engine: sampled groups, verifiable rewards, the clipped policy-ratio loss.

A micro-batch is `batch_size` prompts (`collate`: each sample's served prompt and its reference
answer). Before the loss, `group_size` completions per prompt are sampled from the current
policy (finetune.grpo.rollout) and scored (finetune.grpo.rewards); advantages are normalised
within each prompt's group: (r - mean) / (std + 1e-4), std with Bessel's correction as TRL's
`scale_rewards="group"` (or r - mean with `scale_rewards: none`, Dr. GRPO's choice).

The loss over completion tokens follows TRL 1.16's `GRPOTrainer._compute_loss` (checked in
tests/objectives/test_grpo.py): per token -min(ρ·A, clip(ρ, 1-ε_low, 1+ε_high)·A) with ρ = π/π_old, plus
β·ρ·KL(π‖π_ref) by the k3 estimator when `grpo.beta` > 0 (π_ref: the base with the adapter off,
one no-grad forward per rollout). Log-probabilities are those of the sampling distribution:
soft-capped logits divided by the temperature. `loss_type` normalises as TRL does:
grpo = each completion's token mean, averaged over completions (weight: completions);
dr_grpo = token sums / max_new_tokens over completions (weight: completions); dapo = token sum
over all the window's completion tokens (weight: completion tokens, hence rollouts run when
the loop asks for the weight). With `iterations` = 1 the old policy is the current one (ρ = 1 in
value, its gradient the policy gradient); with more, π_old's log-probs are kept from the rollout
and the loop presents the same prompts `iterations` steps in a row.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from finetune.model.load import unwrap
from finetune.objectives.base import Objective, register

CHAT_FORMATS = ("messages", "sharegpt", "instruction")
ROLLOUT = "_rollout"  # the key a micro-batch carries its rollout under, from weight() to loss()
STD_EPS = 1e-4  # TRL's


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _chunk_logps(h, weight, targets, cap, temperature):
    logits = F.linear(h, weight)  # at least fp32 (a float64 model stays float64: the TRL parity test)
    logits = _softcap(logits.to(torch.promote_types(logits.dtype, torch.float32)), cap) / temperature
    return -F.cross_entropy(logits, targets, reduction="none")


def completion_logps(model, rows: dict, temperature: float, chunk: int = 64) -> torch.Tensor:
    """(N, T) log-probabilities of each completion token under `model` at `temperature` (0 off
    the completion mask). Only completion positions are projected onto the vocabulary, `chunk`
    at a time and recomputed in backward."""
    cg = unwrap(model)
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "position_ids", "pixel_values",
            "image_position_ids", "input_features", "input_features_mask")
    hidden = cg.model(**{k: rows[k] for k in keys if k in rows}, use_cache=False).last_hidden_state
    p, mask = rows["prompt_len"], rows["completion_mask"].bool()
    t = mask.shape[1]
    h = hidden[:, p - 1: p - 1 + t][mask]  # position j predicts completion token j
    targets = rows["completion_ids"][mask]
    cap = cg.config.get_text_config().final_logit_softcapping
    dtype = torch.promote_types(h.dtype, torch.float32)
    pieces = [h[:0].sum(-1).to(dtype)]  # keeps an empty selection on the graph
    for s in range(0, len(targets), chunk):
        args = (h[s:s + chunk], cg.lm_head.weight, targets[s:s + chunk], cap, temperature)
        pieces.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                      else _chunk_logps(*args))
    return torch.zeros(mask.shape, dtype=dtype, device=h.device).masked_scatter(mask, torch.cat(pieces))


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """Advantages of (P·G,) rewards ordered group by group."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale == "group":
        std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        adv = adv / (std + STD_EPS)
    return adv.reshape(-1)


def policy_loss(logps, old, advantages, mask, *, eps_low: float, eps_high: float, beta: float = 0.0,
                ref=None, loss_type: str = "grpo", max_new_tokens: int = 1):
    """(summed loss of the micro-batch, per-token clipped mask, per-token KL or None); see the
    module docstring for the normalisations."""
    mask = mask.float()
    a = advantages.unsqueeze(1)
    coef1 = torch.exp(logps - old)
    coef2 = torch.clamp(coef1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef1 * a, coef2 * a)
    kl = None
    if beta:
        # k3, times the ratio: the unbiased reverse-KL gradient off-policy too (TRL's default
        # `use_bias_correction_kl`; its gradient differs from plain k3 even where ρ = 1)
        kl = (torch.exp(ref - logps) - (ref - logps) - 1) * coef1
        per_token = per_token + beta * kl
    summed = (per_token * mask).sum(-1)
    if loss_type == "grpo":
        total = (summed / mask.sum(-1).clamp(min=1.0)).sum()
    elif loss_type == "dr_grpo":
        total = summed.sum() / max_new_tokens
    else:  # dapo: the token sum; the loop divides by the window's tokens
        total = summed.sum()
    clipped = ((coef1 < 1 - eps_low) & (a < 0)) | ((coef1 > 1 + eps_high) & (a > 0))
    return total, clipped, kl


@register("grpo")
class GRPO(Objective):
    """Group relative policy optimisation with verifiable rewards, online, on the one loop."""

    formats = (*CHAT_FORMATS, "prompt")  # prompt: TRL's prompt-only layout, its other columns to the rewards
    previews = False
    packs = False  # a micro-batch is prompts: `collate` makes it
    uses_reference = True  # allows train.reference_adapter: the start (and with beta > 0 the reference)

    def __init__(self, recipe):
        super().__init__(recipe)
        g = recipe.grpo
        self.g = g
        self.eps_low = g.epsilon
        self.eps_high = g.epsilon if g.epsilon_high is None else g.epsilon_high
        self.grad_accum = recipe.train.grad_accum
        self.steps_per_batch = g.iterations
        self.metrics = ("reward", "reward_std", "completion_length", "clip_ratio", "kl",
                        "rollout/tokens_per_s", "rollout/tokens_per_forward",
                        *(f"rewards/{r.name}/{s}" for r in g.rewards for s in ("mean", "std")))
        self._calls = 0  # rollouts asked for: seeds the next ones; with iterations > 1, which are fresh
        self._cycle: dict[int, dict] = {}  # the window's rollouts, reused for `iterations` steps

    # ------------------------------------------------------------ hooks

    @classmethod
    def check(cls, recipe) -> list:
        from finetune.errors import UserError
        from finetune.grpo.rewards import check_spec

        g, errors = recipe.grpo, []
        if not g.rewards:
            errors.append(UserError("grpo.rewards", "is empty", "List at least one reward, e.g. [{name: exact_match}]"))
        for i, spec in enumerate(g.rewards):
            errors += check_spec(spec, f"grpo.rewards[{i}]")
        if recipe.train.eval_every:
            errors.append(UserError("train.eval_every", "GRPO has no eval loss (each batch's rewards are logged; "
                                    "`finetune eval` reports the mean reward by modality)", "Set train.eval_every: 0"))
        if g.epsilon_high is not None and g.epsilon_high < g.epsilon:
            errors.append(UserError("grpo.epsilon_high", f"{g.epsilon_high} is below grpo.epsilon ({g.epsilon})",
                                    "Give an upper clip >= epsilon, or null"))
        return errors

    @classmethod
    def plan_step(cls, recipe, config):
        from finetune.grpo.plan import estimate_grpo

        return lambda r, sk, device: estimate_grpo(r, sk, device, config)

    def setup(self, model, family):
        return self.prepare_rollouts(self._policy(model, family), family)

    def prepare_rollouts(self, model, family):
        """What rollouts need on a model that already holds its trainable LoRA: the processor,
        sampling, rewards and the drafter; returns the model (the policy rollouts sample from)."""
        from finetune.grpo.rewards import Rewards
        from finetune.grpo.rollout import Sampling
        from finetune.model.generate import stop_ids, suppressed_ids
        from finetune.model.load import load_processor

        r = self.recipe
        self.processor = load_processor(r.model.base, r.data.image_tokens, r.model.trust_remote_code)
        self.chat = family.chat
        tok = self.processor.tokenizer
        thinking = r.data.thinking == "on"
        self.sampling = Sampling(self.g.group_size, self.g.max_new_tokens, self.g.temperature, self.g.top_p,
                                 stop_ids(self.processor, family.chat),
                                 suppressed_ids(self.processor, family.chat, thinking), tok.pad_token_id)
        self.rewards = Rewards(self.g.rewards, family.chat)
        self.drafter = None
        if r.drafter.path:
            from finetune.drafter.model import load_drafter

            lm = unwrap(model)
            d = load_drafter(r.drafter.path, lm.config, device=lm.device).eval()
            d.generation_config.num_assistant_tokens = r.drafter.num_tokens
            d.generation_config.num_assistant_tokens_schedule = "constant"
            self.__dict__["drafter"] = d  # not a submodule: frozen, never trained or checkpointed
        self.__dict__["policy"] = model  # the model weight() rolls out with (no registration)
        return model

    def _policy(self, model, family):
        """The recipe's LoRA, or with `train.reference_adapter` that adapter (GRPO after SFT),
        trainable; with `grpo.beta` > 0 also loaded frozen as the reference policy."""
        if not self.recipe.train.reference_adapter:
            return super().setup(model, family)
        from finetune.objectives.preference import start_from_adapter

        return start_from_adapter(model, self.recipe, reference=bool(self.g.beta))

    def collate(self, samples: list[dict], pad_id: int) -> dict:
        from data_tools.preference import answer_span
        from finetune.drafter.unrolling import served_length, served_prompts

        batch = served_prompts(samples, pad_id)  # input_ids: what the loop counts as tokens
        # the reference: the last answer (the served prompt ends where it starts)
        spans = [(served_length(s["labels"]), answer_span(s["labels"])[1]) for s in samples]
        batch.update(prompts=[served_prompts([s], pad_id) for s in samples],
                     solution_ids=[list(s["input_ids"][a:b]) for s, (a, b) in zip(samples, spans)],
                     modality=[s.get("modality", "text") for s in samples],
                     origin=[s.get("origin", "data") for s in samples],
                     columns=[json.loads(s.get("columns") or "{}") for s in samples])
        return batch

    def weight(self, batch: dict) -> int:
        if self.root is None or ROLLOUT in batch:  # (`loss` asks again, inside the root's forward)
            ro = self.rollout(self.policy, batch)
        else:  # sharded (FSDP2): the root's weights gathered for the rollout's own forwards
            # (initialised as the root first: else the first layer to run would take that role)
            self.root._get_fsdp_state()._lazy_init()
            self.root.unshard()
            try:
                ro = self.rollout(self.policy, batch)
            finally:
                self.root.reshard()
        if self.g.loss_type == "dapo":
            return int(ro["rows"]["completion_mask"].sum())
        return ro["rows"]["completion_ids"].shape[0]

    def loss(self, model, batch: dict):
        ro = self.rollout(model, batch)
        rows, adv = ro["rows"], ro["advantages"]
        mask = rows["completion_mask"]
        logps = completion_logps(model, rows, self.g.temperature)
        old = ro.get("old_logps", logps.detach())
        total, clipped, kl = policy_loss(logps, old, adv, mask, eps_low=self.eps_low, eps_high=self.eps_high,
                                         beta=self.g.beta, ref=ro.get("ref_logps"), loss_type=self.g.loss_type,
                                         max_new_tokens=self.g.max_new_tokens)
        m = mask.float()
        stats = dict(ro["stats"])
        stats["clip_ratio"] = float((clipped.float() * m).sum() / m.sum().clamp(min=1))
        stats["kl"] = float((kl.detach() * m).sum() / m.sum().clamp(min=1)) if kl is not None else 0.0
        # The loop divides metric sums by the window's weight: scale each mean by this batch's weight.
        w = float(self.weight(batch))
        return total, {k: torch.tensor(v * w) for k, v in stats.items()}

    # ------------------------------------------------------------ state

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """What a checkpoint needs to resume exactly (`objective.safetensors`): the count of
        rollouts (it seeds the next ones), and with `iterations` > 1 the rollouts being reused."""
        from finetune.grpo.rollout import cycle_tensors

        out = destination if destination is not None else {}
        out.update({prefix + k: v for k, v in cycle_tensors(self._calls, self._cycle).items()})
        return out

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        from finetune.grpo.rollout import cycle_from_tensors

        if state:
            device = next(self.policy.parameters()).device  # setup ran before the checkpoint loads
            self._calls, self._cycle = cycle_from_tensors({k: v.to(device) for k, v in state.items()})
        return None

    # ------------------------------------------------------------ rollouts

    def rollout(self, model, batch: dict) -> dict:
        """The micro-batch's rollout (made once, kept on the batch; with `iterations` > 1 reused
        from the window `iterations` steps long)."""
        if ROLLOUT in batch:
            return batch[ROLLOUT]
        slot = self._calls % self.grad_accum
        fresh = (self._calls // self.grad_accum) % self.g.iterations == 0
        if fresh or slot not in self._cycle:
            ro = self._make_rollout(model, batch)
            if self.g.iterations > 1:
                self._cycle[slot] = ro
        else:
            ro = self._cycle[slot]
        self._calls += 1
        batch[ROLLOUT] = ro
        return ro

    @torch.no_grad()
    def _make_rollout(self, model, batch: dict) -> dict:
        from finetune.grpo.rollout import prompt_seed, roll_out, rows
        from finetune.objectives.preference import reference_policy

        core = unwrap(model)
        device, dtype = core.device, core.get_input_embeddings().weight.dtype
        prompts = [{k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in p.items()}
                   for p in batch["prompts"]]
        window = self._calls // self.grad_accum  # the same for every micro-batch and rank of a step
        seeds = [prompt_seed(self.recipe.train.seed, window, o) for o in batch["origin"]]
        groups, fig = roll_out(model, prompts, self.sampling, self.drafter, seeds)
        g = self.g.group_size
        completions, raw = [], []
        for grp in groups:
            for ids in grp.ids.tolist():
                completions.append(self._answer(ids))
                raw.append(self._decode(ids, raw=True))
        rep = lambda xs: [x for x in xs for _ in range(g)]  # noqa: E731 - one value per completion
        prompt_text = rep([self._decode(p["input_ids"][0].tolist(), raw=False) for p in batch["prompts"]])
        extra = batch.get("columns") or [{} for _ in batch["prompts"]]  # a `prompt` record's own columns
        columns = {k: rep([c.get(k) for c in extra]) for k in sorted({k for c in extra for k in c})}
        columns |= {"solution": rep([self._answer(s) for s in batch["solution_ids"]]),
                   "raw_solution": rep([self._decode(s, raw=True) for s in batch["solution_ids"]]),
                   "raw_completions": raw, "modality": rep(batch["modality"])}
        total, each = self.rewards.score(prompt_text, completions, columns, rep(batch["origin"]))
        rewards = torch.tensor(total, dtype=torch.float32, device=device)
        out = {"rows": rows(prompts, groups, self.sampling.pad_id), "completions": completions,
               "rewards": rewards, "advantages": group_advantages(rewards, g, self.g.scale_rewards)}
        if self.g.iterations > 1:
            out["old_logps"] = completion_logps(model, out["rows"], self.g.temperature)
        if self.g.beta:
            with reference_policy(model):
                out["ref_logps"] = completion_logps(model, out["rows"], self.g.temperature)
        lengths = out["rows"]["completion_mask"].sum(1).float()
        stats = {"reward": float(rewards.mean()), "completion_length": float(lengths.mean()),
                 "reward_std": float(rewards.view(-1, g).std(1).mean()) if g > 1 else 0.0,
                 "rollout/tokens_per_s": fig["tokens"] / max(fig["seconds"], 1e-9),
                 "rollout/tokens_per_forward": fig["tokens"] / max(fig["forwards"], 1)}
        for name, values in each.items():
            v = torch.tensor(values)
            stats[f"rewards/{name}/mean"] = float(v.mean())
            stats[f"rewards/{name}/std"] = float(v.std()) if len(v) > 1 else 0.0
        out["stats"] = stats
        return out

    def _decode(self, ids: list[int], raw: bool) -> str:
        tok = self.processor.tokenizer
        ids = [t for t in ids if t != tok.pad_token_id]
        return tok.decode(ids, skip_special_tokens=not raw)

    def _answer(self, ids: list[int]) -> str:
        """The answer as served: what follows the thought channel, special tokens dropped."""
        tok = self.processor.tokenizer
        close = tok.convert_tokens_to_ids(self.chat.channel_close)
        ids = [t for t in ids if t != tok.pad_token_id]
        if close in ids:
            ids = ids[len(ids) - ids[::-1].index(close):]
        return tok.decode(ids, skip_special_tokens=True).strip()
