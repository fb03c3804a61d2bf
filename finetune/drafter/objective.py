"""Drafter alignment: distil Gemma 4's MTP drafter from the adapted target, on the shared loop.

A LoRA moves the target's hidden states and next-token distribution; the shipped drafter keeps
predicting the base. This objective re-aligns it. `setup` loads the recipe's adapter onto the
frozen base (4-bit is fine: the target only runs forward), loads the shipped drafter
(`drafter.path`) and makes it the trainable part — all of its weights (`drafter.method: full`) or
a LoRA on its linear layers (`lora`). The objective is a `torch.nn.Module` holding the drafter,
so the loop's optimizer, DDP and checkpoints (`objective.safetensors`) cover it; the target's
embedding is looked up, never copied.

Each micro-batch is the recipe's served prompts (each sample cut where its answer starts, media
included, left-padded). `loss` lets the target continue them greedily (`drafter.continuation_tokens`
tokens: what the drafter meets when serving), runs the target once over prompt + continuation for
its hidden states, shared k/v and next-token distribution, and unrolls the k drafting steps of
transformers' candidate generator from every continuation token (finetune.drafter.unrolling). The loss is
summed over draft slots; the weight is the slots of the micro-batch, known before any forward.
`save` writes the drafter as an HF folder (a LoRA merged in), in the shipped drafter's dtype.
"""

from __future__ import annotations

import torch

from finetune.errors import UserError
from finetune.model.load import unwrap
from finetune.objectives.base import Objective, register

CHAT_FORMATS = ("messages", "sharegpt", "instruction")
# The drafter's linear layers a LoRA goes on (`drafter.method: lora`); the tied output
# embedding stays as shipped.
LORA_TARGETS = r".*(self_attn\.(q_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj)|pre_projection|post_projection)"


class _Frozen:
    """Holds a module without registering it: the target's embedding is read, never trained,
    checkpointed or synchronised as the objective's own."""

    def __init__(self, module):
        self.module = module


@register("drafter")
class DrafterAlignment(Objective):
    metrics = ("drafter/token_acc", "drafter/acceptance")
    formats = CHAT_FORMATS
    previews = False
    packs = False  # it trains on served prompts, each cut where its answer starts
    saves_as = ""  # the run folder itself is the drafter's HF folder
    trains_model = False

    def __init__(self, recipe):
        super().__init__(recipe)
        d = recipe.drafter
        self.k, self.new_tokens, self.kind = d.num_tokens, d.continuation_tokens, d.loss

    # ------------------------------------------------------------ hooks

    @classmethod
    def check(cls, recipe) -> list[UserError]:
        if recipe.drafter.path is None:
            return [UserError("drafter.path", "no drafter to align",
                              "Set drafter.path to the shipped drafter (google/gemma-4-12B-it-assistant for the 12B)")]
        return []

    @classmethod
    def plan_step(cls, recipe, config):
        from finetune.drafter.plan import drafter_config, drafter_shape, estimate_drafter

        shape = drafter_shape(*drafter_config(recipe.drafter.path))
        return lambda r, sk, device: estimate_drafter(r, sk, device, config, shape)

    def setup(self, model, family):
        from finetune.drafter.model import read_config, saved_dtype
        from finetune.model.generate import stop_ids, suppressed_ids
        from finetune.model.load import load_processor

        r, d = self.recipe, self.recipe.drafter
        if d.adapter:
            from finetune.model.adapters import load_adapter

            model = load_adapter(model, d.adapter, allow_pickle=r.model.allow_pickle)
        model.requires_grad_(False)
        lm = unwrap(model)
        self.window = lm.config.get_text_config().sliding_window
        self.embed = _Frozen(lm.get_input_embeddings())
        processor = load_processor(r.model.base, r.data.image_tokens, r.model.trust_remote_code)
        self.suppress = suppressed_ids(processor, family.chat)
        self.stops = None if d.ignore_eos else stop_ids(processor, family.chat)
        # Trained in fp32 (Adam on bf16 weights loses updates), saved in the shipped dtype.
        self.save_dtype = saved_dtype(read_config(d.path))
        self._target_config = lm.config
        drafter = self._build_drafter(lm.device)
        if d.method != "lora":
            drafter.requires_grad_(True)
        self.drafter = drafter.train()
        return model

    def _build_drafter(self, device):
        """The shipped drafter (`drafter.path`), with its LoRA when `drafter.method: lora`."""
        from finetune.drafter.model import load_drafter

        d = self.recipe.drafter
        drafter = load_drafter(d.path, self._target_config, device=device)
        if d.method == "lora":
            from peft import LoraConfig, get_peft_model

            drafter = get_peft_model(drafter, LoraConfig(r=d.lora_r, lora_alpha=d.lora_alpha,
                                                         target_modules=LORA_TARGETS, bias="none"))
        return drafter

    def collate(self, samples: list[dict], pad_id: int) -> dict:
        from finetune.drafter.unrolling import served_prompts

        return served_prompts(samples, pad_id)

    def weight(self, batch: dict) -> int:
        from finetune.drafter.unrolling import slots_per_prompt

        return batch["input_ids"].shape[0] * slots_per_prompt(self.new_tokens, self.k)

    def loss(self, model, batch: dict):
        from finetune.drafter.unrolling import continue_greedy, distill_loss, starts_of, target_states, unroll

        lm = unwrap(model)
        lm.eval()  # the target only runs forward: no dropout, no recompute
        pad = lm.config.get_text_config().pad_token_id
        seq = continue_greedy(model, batch, new_tokens=self.new_tokens, stop_ids=self.stops,
                              suppress=self.suppress, pad_id=pad)
        hidden, shared_kv, target_logp = target_states(lm, seq, [i for (i,) in self.suppress])
        starts = starts_of(seq)
        steps = unroll(self._drafter, self.embed.module, hidden, shared_kv, seq, starts, self.k, self.window)
        return distill_loss(steps, seq, starts, target_logp, self.kind)

    def save(self, model, out, state_dict=None, objective_state=None) -> None:
        from finetune.drafter.model import save_drafter

        drafter = self.drafter
        if objective_state is not None:  # sharded (FSDP): a whole copy holding the gathered weights
            drafter = self._whole_copy(objective_state)
        if hasattr(drafter, "merge_and_unload"):  # a LoRA: servers load plain drafters
            import copy

            drafter = copy.deepcopy(drafter).merge_and_unload()
        save_drafter(drafter, out, num_tokens=self.k, tokenizer_from=self.recipe.model.base, dtype=self.save_dtype)

    # ------------------------------------------------------------ state

    @property
    def _drafter(self):
        """The transformers drafter (under a PEFT wrapper the LoRA layers sit inside it)."""
        return self.drafter.get_base_model() if hasattr(self.drafter, "get_base_model") else self.drafter

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """The weights that train (`objective.safetensors`): the rest is the shipped drafter,
        loaded again on resume; tied weights appear once."""
        out = destination if destination is not None else {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                out[prefix + name] = p if keep_vars else p.detach()
        return out

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        """Whole tensors (a checkpoint's) into the trained weights; under FSDP into this rank's
        shards (every rank calls it: the split is collective)."""
        own = {name: p for name, p in self.named_parameters() if p.requires_grad}
        if strict and set(state) != set(own):
            raise UserError("checkpoint", f"objective.safetensors holds {len(state)} drafter tensors, this run "
                            f"trains {len(own)}", "Resume with the recipe the checkpoint was written with")
        with torch.no_grad():
            for name, value in state.items():
                p = own[name]
                if hasattr(p, "device_mesh"):  # a DTensor shard
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements)
                p.copy_(value)
        return None

    def _whole_copy(self, state: dict):
        """The drafter as `setup` built it, holding `state` (this objective's `state_dict()` keys,
        gathered whole): what a sharded run saves."""
        drafter = self._build_drafter("cpu")
        params = dict(drafter.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name.removeprefix("drafter.")].copy_(value)
        return drafter
