"""`finetune plan`: the predicted peak, its breakdown, and the overrides that would make it fit."""

from __future__ import annotations

import dataclasses

from finetune.errors import UserError
from finetune.objectives.losses import ce_chunk_rows
from finetune.plan.estimate import GIB, estimate
from finetune.plan.sharded import STRATEGIES, longest_seq_len, sharded, step_estimator
from finetune.plan.skeleton import Skeleton, load_config, skeleton

OPT_MIN_SAVING_GIB = 0.005  # a suggestion must save at least this much to be shown

def _result(recipe, sk: Skeleton, est: dict, budget_gib: float, device: str) -> dict:
    peak = sum(est["items"].values()) / GIB
    ordered = sorted(est["items"].items(), key=lambda kv: -kv[1])
    breakdown = {k: round(v / GIB, 6) for k, v in ordered}
    img, aud = est["media"]
    return {
        "peak_gib": round(peak, 3),
        "budget_gib": budget_gib,
        "fits": peak <= budget_gib,
        "allocated_gib": round(est["allocated"] / GIB, 3),  # what torch.cuda.max_memory_allocated sees
        "reserved_gib": round((est["allocated"] + est["items"].get("allocator_slack", 0)) / GIB, 3),
        "breakdown": breakdown,
        "breakdown_bytes": {k: int(v) for k, v in ordered},
        "suggestions": [],
        "suggested_overrides": [],
        "params": {
            "total": sk.total, "embeddings": sk.embeddings, "quantizable_linear": sk.quantizable,
            "linear_not_quantized": sk.linear_kept, "norms_and_other": sk.other,
            "lora_trainable": est["lora_params"], "lora_modules": est["lora_modules"],
        },
        "assumptions": {
            "config": sk.source,
            "device": device,
            "compute_dtype": {2: "bf16" if recipe.model.dtype != "fp16" else "fp16", 4: "fp32"}[
                est["compute_bytes"]],
            "tokens_per_micro_batch": est["tokens"],
            "objective": recipe.train.objective,
            "sequences_per_sample": est.get("rows_per_sample", 1),
            "seq_len": recipe.data.max_seq_len,
            "media_tokens_per_sample": {"image": img, "audio": aud},
            "peak_phase": est["phase"],
            "not_quantized_modules": sk.skipped,
            "attention": "sdpa memory-efficient (no seq² scores); bool masks (batch×seq²) materialised",
            "lora": "fp32 adapter, no autocast: PEFT casts each LoRA input to fp32",
            "chunked_ce": (f"one chunk of {recipe.train.ce_chunk_size or ce_chunk_rows(sk.vocab)} positions "
                           "at a time" if recipe.train.chunked_ce else "full logits for every token"),
            "error_bar": "analytic, calibrated against the 12B measured on an H200 (benchmarks/results/)",
        },
    }


def _with(recipe, overrides: list[str]):
    from finetune.config.recipe import with_overrides

    return with_overrides(recipe, overrides)


def _candidates(recipe, device: str) -> list[list[str]]:
    """Overrides worth trying, each a change from the recipe as it is."""
    t, d, m, lo = recipe.train, recipe.data, recipe.model, recipe.lora
    out: list[list[str]] = []
    if not t.chunked_ce:
        out.append(["train.chunked_ce=true"])
    if not t.gradient_checkpointing:
        out.append(["train.gradient_checkpointing=true"])
    elif device == "cuda" and not t.offload_activations:
        out.append(["train.offload_activations=true"])
    if t.optimizer in ("adamw", "paged_adamw"):
        out.append(["train.optimizer=adamw8bit"])
    if m.quantization != "nf4":
        out.append(["model.quantization=nf4"])
    elif not m.double_quant:
        out.append(["model.double_quant=true"])
    if t.batch_size > 1:
        out.append(["train.batch_size=1", f"train.grad_accum={t.batch_size * t.grad_accum}"])
    if t.packing:
        out.append(["train.packing=false"])
    if t.objective == "drafter":  # the target's adapter is trained already: its rank is given
        if recipe.drafter.method == "full":
            out.append(["drafter.method=lora"])
    elif lo.r > 4:
        out.append([f"lora.r={lo.r // 2}"])
    smaller = [x for x in (70, 140, 280, 560, 1120) if x < d.image_tokens]
    if smaller:
        out.append([f"data.image_tokens={smaller[-1]}"])
    if t.chunked_ce and t.ce_chunk_size and t.ce_chunk_size > 16:
        out.append([f"train.ce_chunk_size={t.ce_chunk_size // 2}"])
    if t.mlp_tile_tokens == 0 and d.max_seq_len > 1024:
        out.append(["train.mlp_tile_tokens=1024"])
    if t.attention != "blocked" and d.max_seq_len > 1024:
        out.append(["train.attention=blocked"])
        out.append(["train.attention=blocked", "train.tile_attention=true"])
    elif not t.tile_attention and d.max_seq_len > 1024:
        out.append(["train.tile_attention=true"])
    return out


def _fitting_seq_len(recipe, sk: Skeleton, device: str, budget_gib: float, estimate=estimate) -> int | None:
    """The longest max_seq_len (a multiple of 256, below the current one) that fits."""
    lo, hi = 1, recipe.data.max_seq_len // 256  # in units of 256 tokens
    if hi * 256 == recipe.data.max_seq_len:
        hi -= 1
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        r = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, max_seq_len=mid * 256))
        if sum(estimate(r, sk, device)["items"].values()) / GIB <= budget_gib:
            best, lo = mid * 256, mid + 1
        else:
            hi = mid - 1
    return best


def _suggest(recipe, sk: Skeleton, device: str, budget_gib: float, peak: float,
             estimate=estimate) -> tuple[list[str], list[dict]]:
    """Single overrides with what each saves, then one stack of them that fits."""
    def peak_of(r) -> float:
        return sum(estimate(r, sk, device)["items"].values()) / GIB

    def entry(ov: list[str]) -> dict:
        new = peak_of(_with(recipe, ov))
        return {"overrides": ov, "saves_gib": round(peak - new, 3), "peak_gib": round(new, 3),
                "fits": new <= budget_gib}

    singles = [entry(ov) for ov in _candidates(recipe, device)]
    singles = sorted((x for x in singles if x["saves_gib"] >= OPT_MIN_SAVING_GIB), key=lambda x: -x["saves_gib"])
    seq = _fitting_seq_len(recipe, sk, device, budget_gib, estimate)
    if seq:
        singles.append(entry([f"data.max_seq_len={seq}"]))
    # Shorter samples change what the model learns: when no other single change is enough,
    # stack the others (biggest first, skipping crumbs) and shorten samples only as a last step.
    out = singles
    if not any(x["fits"] for x in singles if not x["overrides"][0].startswith("data.max_seq_len")):
        combo: list[str] = []
        for x in singles:
            if x["overrides"][0].startswith("data.max_seq_len") or x["saves_gib"] < 0.1:
                continue
            combo += x["overrides"]
            if peak_of(_with(recipe, combo)) <= budget_gib:
                break
        if combo and peak_of(_with(recipe, combo)) > budget_gib:
            seq = _fitting_seq_len(_with(recipe, combo), sk, device, budget_gib, estimate)
            combo += [f"data.max_seq_len={seq}"] if seq else []
        if len(combo) > 1 and peak_of(_with(recipe, combo)) <= budget_gib:
            out = [entry(combo)] + singles
    lines = [f"{' '.join(x['overrides'])}  # saves {x['saves_gib']:.2f} GiB -> {x['peak_gib']:.2f} GiB"
             f"{' (fits)' if x['fits'] else ''}" for x in out]
    return lines, out


def plan(recipe, *, budget_gib: float = 16.0, device: str = "cuda", gpus: int = 1, strategy: str = "ddp") -> dict:
    """Predict peak GPU memory of one training step of `recipe` (see the module docstring); with
    `gpus` > 1, on each GPU under `strategy` (ddp or fsdp, finetune.plan.sharded)."""
    if device not in ("cuda", "cpu"):
        raise UserError("device", f"{device!r} is not cuda or cpu", "Use cuda or cpu")
    if strategy not in STRATEGIES:
        raise UserError("--strategy", f"{strategy!r} is not one of {', '.join(STRATEGIES)}", "Use ddp or fsdp")
    from finetune.plan.tiles import resolved

    auto = recipe.train.mlp_tile_tokens == "auto"
    recipe, tile_line = resolved(recipe, budget_gib, device=device, gpus=gpus, strategy=strategy)
    config, source = load_config(recipe.model)
    sk = skeleton(config, source)
    step = sharded(step_estimator(recipe, config), gpus, strategy)
    est = step(recipe, sk, device)
    out = _result(recipe, sk, est, budget_gib, device)
    out["assumptions"]["gpus"], out["assumptions"]["strategy"] = gpus, strategy if gpus > 1 else "one GPU"
    out["longest_seq_len"] = longest_seq_len(recipe, sk, device, budget_gib, step)
    if auto:
        out["assumptions"]["mlp_tile_tokens"] = tile_line
    if gpus > 1 and strategy == "fsdp":  # what `train` would refuse under FSDP, said up front
        from finetune.errors import RecipeErrors
        from finetune.plan.checks import sharding_problems

        try:
            sharding_problems(recipe)
        except RecipeErrors as e:
            out["assumptions"]["fsdp_refuses"] = e.lines()
    for feature in ("drafter", "grpo"):  # what an objective's own estimator planned
        if feature in est:
            out["assumptions"][feature] = est[feature]
    if not out["fits"]:
        out["suggestions"], out["suggested_overrides"] = _suggest(
            recipe, sk, device, budget_gib, sum(est["items"].values()) / GIB, step)
    return out
