"""Typed recipes: YAML in, a validated `Recipe` out, every problem reported at once.

Each section is a small dataclass; the field docs are the reference for recipe authors
(`finetune validate` prints them in error messages). The typed-YAML machinery (safe loading,
conversion, overrides) lives in `finetune.config.schema`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune.config.schema import build_section, path_kind, resolve_path, resolve_paths, show
from finetune.config.schema import field_doc as _f
from finetune.config.yaml_io import apply_override, dump_yaml, parse_override, read_yaml
from finetune.errors import RecipeErrors, UserError


@dataclass
class ModelSection:
    base: str = _f(doc="hub id or local folder of the base model (a gemma4_unified checkpoint)",
                   path="local_or_hub")
    quantization: Literal["nf4", "int8", "none"] = _f("nf4", "how the frozen base is stored")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "compute dtype on a GPU; auto = bf16. On the CPU every setting computes in fp32")
    double_quant: bool = _f(True, "NF4 double quantization of the block scales")
    quant_storage: Literal["uint8", "bf16"] = _f(
        "uint8", "storage dtype of 4-bit weights; FSDP needs bf16")
    trust_remote_code: bool = _f(False, "run code shipped with the model (off unless you trust it)")
    allow_pickle: bool = _f(False, "allow .bin/.pt weights (pickle can run code)")


@dataclass
class DatasetSpec:
    path: str = _f(doc="file, folder, glob, HF datasets folder or hub id", path="local_or_hub")
    media_root: str | None = _f(None, "folder that relative media paths in the records resolve "
                                "against (default: the data file's folder)", path="local")
    format: Literal["messages", "sharegpt", "text", "instruction", "preference", "prompt"] = _f(
        "messages", "record layout (preference: TRL's prompt/chosen/rejected or prompt/completion/label; "
        "prompt: a prompt and any columns the GRPO rewards read)")
    weight: float = _f(1.0, "share of the mix", lo=0.0)
    split: str | None = _f(None, "split of a HF dataset")
    max_samples: int | None = _f(None, "take at most this many records", lo=1)
    columns: dict[str, str] = _f(factory=dict, doc="rename columns: {our_name: their_name}")
    metric: Literal["exact_match", "token_f1", "cer", "wer"] | None = _f(
        None, "eval metric for this dataset (default: eval.metric)")


@dataclass
class DataSection:
    max_seq_len: int = _f(2048, "tokens per sample, media included", lo=16, hi=1_048_576)
    on_bad_record: Literal["error", "skip"] = _f("error", "stop on a bad record, or skip and log it")
    max_rejected_fraction: float = _f(0.5, "skipped records allowed per dataset, as a share of its records: "
                                      "more stops the run (a dataset that yields nothing always does)",
                                      lo=0.0, hi=1.0)
    train_on: Literal["assistant", "last_assistant", "all"] = _f("assistant", "which tokens carry loss")
    thinking: Literal["auto", "on", "off"] = _f(
        "auto", "render with thinking on (the model writes its trace), off (traces dropped), or auto: "
        "on for samples that carry a trace")
    image_tokens: Literal[70, 140, 280, 560, 1120] = _f(280, "soft tokens per image")
    overflow: Literal["drop", "shrink", "truncate_text"] = _f(
        "shrink", "what to do with a sample longer than max_seq_len")
    max_audio_seconds: float = _f(30.0, "longest audio clip", lo=0.04)
    audio_overflow: Literal["trim", "reject"] = _f("trim", "what to do with a longer clip")
    max_image_pixels: int = _f(50_000_000, "refuse larger images (decompression bombs)", lo=1)
    max_media_bytes: int = _f(100_000_000, "refuse larger media files", lo=1)
    allow_network_media: bool = _f(False, "fetch http(s) media URLs")
    mix_by: Literal["samples", "tokens"] = _f("samples", "what dataset weights balance")
    eval_fraction: float = _f(0.0, "held-out share when no eval_datasets are given", lo=0.0, hi=0.9)
    num_proc: int = _f(1, "processes for preprocessing", lo=1, hi=256)
    streaming: bool = _f(False, "tokenize on the fly instead of caching")
    cache_dir: str | None = _f(None, "tokenized-data cache (default: .cache/finetune-data next to "
                               "train.output_dir); `finetune data clear-cache RECIPE` empties it",
                               path="local")
    cache: bool = _f(True, "reuse tokenized data when nothing it was made from changed (data files, "
                     "media files, data settings, processor); false renders every time")
    seed: int = _f(0, "seed for splits and mixing")


@dataclass
class LoraSection:
    r: int = _f(16, "LoRA rank", lo=1, hi=4096)
    alpha: float = _f(32.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)", lo=0.0)
    dropout: float = _f(0.0, "LoRA dropout", lo=0.0, hi=0.9)
    targets: list[str] = _f(factory=lambda: ["attention", "mlp"],
                            doc="presets attention, mlp, vision, audio, all, or regexes")
    use_rslora: bool = _f(False, "rank-stabilised LoRA scaling")


@dataclass
class TrainSection:
    objective: str = _f("sft", "what to train: sft (next-token cross-entropy on the answers); dpo, orpo "
                        "or kto (preference tuning on `format: preference` data); grpo (online RL with "
                        "the `grpo` section's rewards); drafter (align the MTP drafter)")
    reference_adapter: str | None = _f(None, "dpo/kto/grpo: an adapter folder (usually SFT) that is the "
                                       "reference policy and the policy's start (default: the base "
                                       "with the adapter switched off)", path="local")
    output_dir: str = _f("runs/train", "where adapter, checkpoints and logs go", path="local")
    max_steps: int | None = _f(None, "optimizer steps (default 100 unless train.epochs is given)", lo=1)
    epochs: float | None = _f(None, "passes over the training data instead of max_steps", lo=0.01)
    lr: float = _f(2e-4, "peak learning rate", lo=0.0, hi=1.0)
    batch_size: int = _f(1, "samples per micro-batch per process", lo=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", lo=1)
    seed: int = _f(0, "seed for init, shuffling and dropout")
    save_every: int = _f(0, "checkpoint every N steps (0 = only at the end)", lo=0)
    keep_checkpoints: int = _f(2, "newest checkpoints to keep", lo=1)
    eval_every: int = _f(0, "eval loss every N steps (0 = off)", lo=0)
    keep_best: bool = _f(False, "also keep the adapter with the lowest eval loss in <output_dir>/best")
    early_stopping_patience: int = _f(0, "stop after this many evals without a lower eval loss (0 = off)", lo=0)
    preview_every: int = _f(0, "generate on held-out items every N steps (0 = off)", lo=0)
    preview_items: int = _f(3, "how many held-out items to preview", lo=1)
    chunked_ce: bool = _f(True, "cross-entropy in chunks over label positions only")
    ce_chunk_size: int | None = _f(None, "label positions per CE chunk (default: as many as keep one "
                                   "chunk's logits near 256 MiB: 64 at a 262k vocabulary)", lo=1)
    gradient_checkpointing: bool = _f(True, "recompute decoder layers in backward")
    offload_activations: bool = _f(True, "keep checkpointed layer inputs in pinned host memory "
                                   "(CUDA only; the loss is unchanged)")
    offload_prefetch: bool = _f(False, "with offload_activations: copy on a side CUDA stream (overlapping "
                                "compute) and bring each layer input back one layer ahead")
    mlp_tile_tokens: int | Literal["auto"] = _f(
        0, "run each layer's MLP in sequence tiles of this many tokens under their own recompute (0 = "
        "off): less memory on long sequences, one extra MLP forward; auto: none when the plan fits the "
        "memory free at the start, else the largest tile that does (finetune.plan.tiles)", lo=0)
    attention: Literal["sdpa", "sdpa_gqa", "blocked"] = _f(
        "sdpa", "the language model's attention (the loss is unchanged): sdpa, transformers' own (k/v "
        "repeated to every query head when a mask is passed); sdpa_gqa, one sdpa call with native GQA; "
        "blocked, queries in blocks with k/v never repeated, each block's keys cut to what its mask "
        "allows and each block recomputed in backward (less memory on long rows, no masked-away scores)")
    attention_block_rows: int = _f(4096, "train.attention blocked: query rows of one block (block "
                                   "queries × query heads per k/v head)", lo=1)
    tile_attention: bool = _f(False, "with train.attention blocked: each layer's q/k/v/o projections "
                              "also run by sequence tile under their own recompute (the same loss; "
                              "less memory on long rows, finetune.model.tiled_attention)")
    group_by_length: bool = _f(True, "batch samples of similar length")
    packing: bool = _f(False, "pack several samples per row")
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = _f("adamw")
    scheduler: Literal["cosine", "linear", "constant"] = _f("cosine")
    warmup: float = _f(0.0, "warmup steps (>= 1) or fraction of max_steps (< 1)", lo=0.0)
    weight_decay: float = _f(0.0, lo=0.0)
    max_grad_norm: float = _f(1.0, "clip gradients (0 = off)", lo=0.0)
    report_to: list[str] = _f(factory=list, doc="tensorboard and/or wandb")
    log_every: int = _f(1, "write metrics every N steps", lo=1)


@dataclass
class PreferenceSection:
    beta: float = _f(0.1, "dpo/kto: β, how strongly the policy is held to the reference; orpo: λ, the "
                     "weight of the odds-ratio term", lo=1e-6)
    loss_type: Literal["sigmoid", "ipo"] = _f("sigmoid", "dpo: sigmoid (the DPO paper) or ipo "
                                              "(squared, on per-token log-ratios, as TRL computes it)")
    sft_weight: float = _f(0.0, "dpo: weight α of the chosen answer's mean token NLL added to each pair's "
                           "loss (RPO; TRL: loss_type [sigmoid, sft], loss_weights [1, α]); 0 = DPO alone",
                           lo=0.0)
    desirable_weight: float = _f(1.0, "kto: weight of desirable examples' losses", lo=0.0)
    undesirable_weight: float = _f(1.0, "kto: weight of undesirable examples' losses", lo=0.0)


@dataclass
class EvalSection:
    metric: Literal["exact_match", "token_f1", "cer", "wer"] = _f("exact_match")
    max_new_tokens: int = _f(32, lo=1)
    max_items: int | None = _f(None, lo=1)
    batch_size: int = _f(8, lo=1)
    tool_responder: str | None = _f(None, "module:function(name, arguments) -> str answering tool calls in the "
                                    "agent-loop evaluation of tool-use items (default: the item's recorded "
                                    "responses)")


@dataclass
class DrafterSection:
    """Aligning the MTP drafter to the adapted model (`train.objective: drafter`, `finetune align-drafter`,
    and drafter acceptance in `finetune eval`); see finetune.drafter.objective."""
    path: str | None = _f(None, "the shipped MTP drafter: hub id or folder (google/gemma-4-12B-it-assistant)",
                          path="local_or_hub")
    adapter: str | None = _f(None, "the target's adapter the drafter is aligned to (--adapter); null = the base",
                             path="local")
    method: Literal["full", "lora"] = _f("full", "train every drafter weight, or LoRA on its linear layers")
    lora_r: int = _f(16, "rank of the drafter LoRA (method: lora)", lo=1, hi=4096)
    lora_alpha: float = _f(32.0, "alpha of the drafter LoRA (method: lora)", lo=0.0)
    num_tokens: int = _f(4, "draft tokens per round (k): unrolled in training, drafted when measured", lo=1, hi=16)
    continuation_tokens: int = _f(64, "tokens of the target's greedy continuation of each prompt (train, "
                                  "measure)", lo=2, hi=4096)
    ignore_eos: bool = _f(False, "continue past the end of turn: fixed-length outputs, as serving "
                          "benchmarks measure (vllm bench --ignore-eos)")
    loss: Literal["kl", "ce"] = _f("kl", "match the target's next-token distribution (kl) or its greedy "
                                   "token (ce)")
    eval_items: int = _f(24, "held-out prompts acceptance is measured on (spread over modalities)", lo=1)


@dataclass
class RewardSpec:
    name: str = _f(doc="a built-in (exact_match, contains, regex, numeric, tool_call, format) or a user function "
                   "module:function(prompts, completions, **columns) -> list[float]")
    weight: float = _f(1.0, "its share of the reward (rewards are summed with these weights)")
    pattern: str | None = _f(None, "regex: the pattern the whole answer must match")
    tolerance: float = _f(1e-6, "numeric: the largest |answer - reference| that still scores 1", lo=0.0)


@dataclass
class GrpoSection:
    """Online RL with verifiable rewards (`train.objective: grpo`); see finetune.grpo.objective."""
    group_size: int = _f(8, "completions sampled per prompt; advantages are normalised within each group", lo=2, hi=1024)
    max_new_tokens: int = _f(256, "longest completion", lo=1, hi=65536)
    temperature: float = _f(1.0, "sampling temperature (the loss scores tokens at the same temperature)", lo=1e-3)
    top_p: float = _f(1.0, "nucleus sampling", lo=1e-3, hi=1.0)
    beta: float = _f(0.0, "weight of KL(policy ‖ reference) (the base with the adapter off, or "
                     "train.reference_adapter); 0 = no reference forward", lo=0.0)
    iterations: int = _f(1, "optimizer steps on each batch of rollouts (μ); > 1 keeps the sampling policy's "
                         "log-probs for the clipped ratio", lo=1, hi=64)
    epsilon: float = _f(0.2, "clip range of the policy ratio: [1 - epsilon, 1 + epsilon_high]", lo=0.0, hi=1.0)
    epsilon_high: float | None = _f(None, "upper clip (DAPO's clip-higher, e.g. 0.28); null = epsilon", lo=0.0)
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = _f(
        "grpo", "normalisation: grpo = each completion's token mean, averaged; dapo = over all completion "
        "tokens of the step; dr_grpo = token sums / max_new_tokens")
    scale_rewards: Literal["group", "none"] = _f("group", "divide advantages by the group's reward std "
                                                 "(none: Dr. GRPO)")
    rewards: list[RewardSpec] = _f(factory=lambda: [RewardSpec(name="exact_match")],
                                   doc="what a completion scores: [{name, weight, ...}]")


@dataclass
class Recipe:
    model: ModelSection
    datasets: list[DatasetSpec]
    eval_datasets: list[DatasetSpec] = _f(factory=list)
    data: DataSection = _f(factory=DataSection)
    lora: LoraSection = _f(factory=LoraSection)
    train: TrainSection = _f(factory=TrainSection)
    preference: PreferenceSection = _f(factory=PreferenceSection)
    eval: EvalSection = _f(factory=EvalSection)
    drafter: DrafterSection = _f(factory=DrafterSection)
    grpo: GrpoSection = _f(factory=GrpoSection)
    source: str = field(default="<recipe>", metadata={"internal": True})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


REPORT_TO = ("tensorboard", "wandb")


def _cross_checks(r: Recipe, errors: list[UserError]) -> None:
    """Rules that span several keys."""
    if not r.datasets:
        errors.append(UserError("datasets", "is empty", "List at least one dataset"))
    if r.datasets and sum(d.weight for d in r.datasets) <= 0:
        errors.append(UserError("datasets", "all weights are zero", "Give one dataset a weight > 0"))
    for i, name in enumerate(r.train.report_to):
        if name not in REPORT_TO:
            errors.append(UserError(f"train.report_to[{i}]", f"{name!r} is not a known tracker",
                                    f"Use one of {', '.join(REPORT_TO)}"))
    from finetune.model.lora import PRESETS, check_target

    for i, t in enumerate(r.lora.targets):
        try:
            problem = check_target(t)
        except (RecursionError, OverflowError, ValueError) as e:  # re.compile on pathological patterns
            problem = f"{show(t)} is not a valid regex ({type(e).__name__})"
        if problem:
            errors.append(UserError(f"lora.targets[{i}]", problem,
                                    f"Use a preset ({', '.join(PRESETS)}) or a valid regex"))
    from finetune.objectives import get as objective
    from finetune.objectives import names as objectives

    cls = objective(r.train.objective)
    if cls is None:
        errors.append(UserError("train.objective", f"{r.train.objective!r} is not a training objective",
                                f"Use one of {', '.join(objectives())}"))
    elif cls.formats is not None:
        for key, specs in (("datasets", r.datasets), ("eval_datasets", r.eval_datasets)):
            for i, ds in enumerate(specs):
                if ds.format not in cls.formats:
                    errors.append(UserError(f"{key}[{i}].format", f"{ds.format!r} data can't train objective "
                                            f"{r.train.objective!r}", f"Use format {' or '.join(cls.formats)}"))
    _objective_checks(r, cls, errors)
    t = r.train
    if t.epochs is not None and t.max_steps is not None:
        errors.append(UserError("train.epochs", "both train.epochs and train.max_steps are set",
                                "Give one of them"))
    if t.epochs is not None and r.data.streaming:
        errors.append(UserError("train.epochs", "a streamed dataset has no known length",
                                "Use train.max_steps with data.streaming, or data.streaming: false"))
    for key in ("keep_best", "early_stopping_patience"):
        if getattr(t, key) and not t.eval_every:
            errors.append(UserError(f"train.{key}", "needs an eval loss", "Set train.eval_every (and eval data: "
                                    "eval_datasets or data.eval_fraction)"))
    if t.tile_attention and t.attention != "blocked":
        errors.append(UserError("train.tile_attention", f"tiles the blocked attention, not {t.attention!r}",
                                "Set train.attention: blocked, or train.tile_attention: false"))
    if r.train.packing and r.data.streaming:
        errors.append(UserError("train.packing", "packing needs the cached dataset",
                                "Set data.streaming: false or train.packing: false"))


def _objective_checks(r: Recipe, cls, errors: list[UserError]) -> None:
    """What an objective declares: a reference policy (`uses_reference`), packing (`packs`)."""
    if cls is None:
        return
    if r.train.reference_adapter and not cls.uses_reference:
        errors.append(UserError("train.reference_adapter", f"objective {r.train.objective!r} has no "
                                "reference policy", "Remove the key, or use train.objective dpo or kto"))
    if r.train.packing and not cls.packs:
        errors.append(UserError("train.packing", f"objective {r.train.objective!r} does not pack samples "
                                "into rows (it makes its own micro-batches)", "Set train.packing: false"))
    errors.extend(cls.check(r))
    for key, specs in (("datasets", r.datasets), ("eval_datasets", r.eval_datasets)):
        for i, ds in enumerate(specs):
            if ds.format == "preference" and "preference" not in (cls.formats or ()):
                errors.append(UserError(f"{key}[{i}].format", f"preference data can't train objective "
                                        f"{r.train.objective!r}", "Use train.objective dpo, orpo or kto"))
            if ds.format == "prompt" and "prompt" not in (cls.formats or ()):
                errors.append(UserError(f"{key}[{i}].format", f"prompt-only data has no answer to train "
                                        f"objective {r.train.objective!r} on", "Use train.objective grpo"))


def recipe_from_dict(raw: Any, source: str = "<recipe>") -> Recipe:
    errors: list[UserError] = []
    if raw is None:
        raise UserError(source, "the recipe is empty", "Add model:, datasets: and train: sections")
    recipe = build_section(Recipe, raw, "", errors)
    if recipe is not None and not errors:
        _cross_checks(recipe, errors)
    if errors:
        raise RecipeErrors(errors)
    recipe.source = source
    if recipe.train.max_steps is None and recipe.train.epochs is None:
        recipe.train.max_steps = 100
    if recipe.data.cache_dir is None:
        recipe.data.cache_dir = str(Path(recipe.train.output_dir).parent / ".cache" / "finetune-data")
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The recipe at `path`. One rule for paths: those written in the file resolve against the
    file's folder, those typed as overrides on the command line against the current folder."""
    raw = read_yaml(path)
    if raw is not None and not isinstance(raw, dict):
        raise UserError(str(path), f"the recipe must be a mapping, got {type(raw).__name__}",
                        "Start with `model:` at the top level")
    raw = raw or {}
    resolve_paths(Recipe, raw, Path(path).resolve().parent)
    apply_overrides(raw, overrides)
    return recipe_from_dict(raw if raw else None, str(path))


def apply_overrides(raw: dict, overrides) -> None:
    """`key.path=value` overrides into `raw`; a path value resolves against the current folder."""
    for text in overrides:
        keys, value = parse_override(text)
        kind = path_kind(Recipe, keys)
        if kind and isinstance(value, str) and value:
            value = resolve_path(value, kind, Path.cwd())
        apply_override(raw, keys, value)


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(dump_yaml(recipe.to_dict()))


def with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """A copy of `recipe` with `key.path=value` overrides applied and validated again."""
    raw = recipe.to_dict()
    apply_overrides(raw, overrides)
    return recipe_from_dict(raw, recipe.source)
