"""Combine several LoRA adapters of one base into one adapter: `finetune combine SPEC.yaml`.

The spec (`CombineSpec`, read and validated by `read_spec`, every error at once) lists the
adapters with their weights and picks one of PEFT's `add_weighted_adapter` methods. The
LoRA tensors are combined on a weightless copy of the base's module tree, so no model is
loaded. The result is held against the weighted sum of the source updates: `cat` must
reproduce it; `svd` reports its truncation error; linear, ties, dare_* and magnitude_prune
weight A and B apart and are not blends of updates, which the report says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from finetune.config.schema import build_section, field_doc
from finetune.config.yaml_io import read_yaml
from finetune.errors import RecipeErrors, UserError
from finetune.model.adapters import (
    WEIGHTS_FILE,
    ParityError,
    base_of,
    check_base,
    delta,
    lora_pairs,
    max_rel_diff,
    model_class,
    prepare_out,
    read_adapter,
    write_report,
)

Method = Literal["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune"]
METHODS = get_args(Method)
EQUAL_RANKS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
USES_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")
USES_SVD_RANK = ("svd", "ties_svd")


@dataclass
class AdapterRef:
    path: str = field_doc(doc="adapter folder; a relative path resolves against the spec file's folder")
    weight: float = field_doc(1.0, "weight of this adapter (negative subtracts)")


@dataclass
class CombineSpec:
    method: Method = field_doc(
        doc="cat and svd blend the updates B·A; linear, ties, dare_* and magnitude_prune weight A and B apart")
    adapters: list[AdapterRef] = field_doc(doc="the adapters, each {path, weight}")
    output: str = field_doc(doc="folder for the combined adapter (relative to the spec file's folder)")
    density: float | None = field_doc(None, "share of values kept by ties/dare/magnitude_prune", lo=0.0, hi=1.0)
    svd_rank: int | None = field_doc(None, "rank of the svd/ties_svd result (default: the largest input rank)", lo=1)
    base: str | None = field_doc(None, "base model, when the adapters' own base_model_name_or_path is stale")


def read_spec(path: str | Path) -> CombineSpec:
    """The validated spec, or every problem in it at once (key paths prefixed by the file)."""
    path = Path(path)
    raw = read_yaml(path)
    errors: list[UserError] = []
    spec = build_section(CombineSpec, raw, "", errors)
    if spec is not None:
        spec.adapters = [a for a in spec.adapters if a is not None]  # bad items are already reported
        if not spec.adapters:
            errors.append(UserError("adapters", "is empty", "List at least one {path, weight}"))
        elif all(a.weight == 0 for a in spec.adapters):
            errors.append(UserError("adapters", "all weights are zero", "Give one adapter a nonzero weight"))
    # Rules across keys, read from the raw mapping so they are reported next to any other error.
    method, density = (raw.get("method"), raw.get("density")) if isinstance(raw, dict) else (None, None)
    if method in USES_DENSITY and density is None:
        errors.append(UserError("density", f"is required by {method}", "Add `density: 0.5` (share kept)"))
    if method in USES_DENSITY and density == 0:
        errors.append(UserError("density", "0 prunes every value", "Use a density in (0, 1]"))
    if method in METHODS and method not in USES_DENSITY and density is not None:
        errors.append(UserError("density", f"{method} does not prune",
                                f"Remove it; density applies to {', '.join(USES_DENSITY)}"))
    if method in METHODS and method not in USES_SVD_RANK and isinstance(raw, dict) and "svd_rank" in raw:
        errors.append(UserError("svd_rank", f"{method} does not use svd_rank", "Remove it"))
    if errors:
        raise RecipeErrors([UserError(f"{path}: {e.where}", e.what, e.fix) for e in errors])
    here = path.parent
    for a in spec.adapters:
        a.path = str(here / a.path)
    spec.output = str(here / spec.output)
    return spec


def _max_rank(config: dict) -> int:
    return max([config["r"], *(config.get("rank_pattern") or {}).values()])


def _lora_host(family, cfg) -> torch.nn.Module:
    """The base's module tree with weightless linears. PEFT's weighted-adapter maths reads only
    the LoRA tensors, so a 12B base need not be loaded to combine its adapters."""
    with torch.device("meta"):
        model = model_class(family)(cfg)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            # A zero-stride CPU view owns one float but has the right shape, so PEFT puts the
            # LoRA tensors it creates next to it on the CPU (a meta weight would make them meta).
            mod.weight = torch.nn.Parameter(torch.zeros(()).expand(mod.out_features, mod.in_features),
                                            requires_grad=False)
    return model


def combine(spec_path: str | Path, *, log: Callable[[str], None] | None = None) -> dict:
    """`finetune combine SPEC.yaml`: PEFT's add_weighted_adapter on the adapters the spec lists.
    `log` receives the summary lines (None: silent)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import save_file

    log = log or (lambda _: None)
    spec = read_spec(spec_path)
    loaded = [(Path(a.path), a.weight, *read_adapter(a.path)) for a in spec.adapters]
    bases = {}
    for path, _, config, _ in loaded:
        if config.get("modules_to_save"):
            raise UserError(str(path), f"has modules_to_save ({config['modules_to_save']}); combine merges "
                            "LoRA tensors only", "Combine adapters trained without modules_to_save")
        bases.setdefault(base_of(path, config, spec.base), []).append(str(path))
    if len(bases) > 1:
        raise UserError(f"{spec_path}: adapters", f"the adapters name different bases: {bases}",
                        "Combine adapters of one base, or set `base:` if a path is merely stale")
    base = next(iter(bases))
    family, cfg = None, None
    for path, _, _, state in loaded:
        family, cfg = check_base(path, state, base)
    ranks = [_max_rank(config) for _, _, config, _ in loaded]
    if spec.method in EQUAL_RANKS and len(set(ranks)) > 1:
        raise UserError(f"{spec_path}: method", f"{spec.method} needs adapters of equal rank, these have "
                        f"r = {ranks}", f"Use cat (rank = sum of ranks = {sum(ranks)}) or svd "
                        f"(rank = svd_rank, default {max(ranks)}), which accept any ranks")
    out = prepare_out(spec.output, *(p for p, *_ in loaded))

    names = [f"a{i}" for i in range(len(loaded))]
    peft_model = None
    for name, (path, _, _, state) in zip(names, loaded):
        lora = LoraConfig.from_pretrained(str(path))
        lora.target_modules = set(lora_pairs(state))  # exact names: PEFT unions sets, not regexes
        lora.inference_mode = True
        if peft_model is None:
            peft_model = get_peft_model(_lora_host(family, cfg), lora, adapter_name=name)
        else:
            peft_model.add_adapter(name, lora)
        result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
        assert not result.unexpected_keys, result.unexpected_keys[:3]  # shapes were checked above
    torch.manual_seed(0)  # dare_* drop values at random: the same spec gives the same adapter
    peft_model.add_weighted_adapter(names, [w for _, w, *_ in loaded], "combined", combination_type=spec.method,
                                    density=spec.density, svd_rank=spec.svd_rank)
    combined = {k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model, adapter_name="combined").items()}
    new = peft_model.peft_config["combined"]
    # PEFT copies the first adapter's rsLoRA flag, but the combined tensors already carry each
    # source's scale and expect scale 1 (alpha = r): with the flag kept they'd be off by sqrt(r).
    new.use_rslora = False
    new.base_model_name_or_path = base
    new.target_modules = sorted({k.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for k in combined})
    new.save_pretrained(str(out))
    save_file(combined, str(out / WEIGHTS_FILE), metadata={"format": "pt"})

    # How far the result is from the weighted sum of the updates: 0 for cat, the truncation
    # error for svd, and for linear/ties/dare a reminder that they are not blends of updates.
    new_config, new_state = read_adapter(out)
    sums: dict[str, torch.Tensor] = {}
    for _, weight, config, state in loaded:
        for m, (A, B) in lora_pairs(state).items():
            sums[m] = sums.get(m, 0) + weight * delta(config, m, A, B)
    distance = max(max_rel_diff(delta(new_config, m, A, B), sums[m]) for m, (A, B) in lora_pairs(new_state).items())
    report = {"method": spec.method, "adapters": [str(p) for p, *_ in loaded], "weights": [w for _, w, *_ in loaded],
              "ranks": ranks, "rank": new.r, "density": spec.density, "base": base, "out": str(out),
              "max_rel_distance_from_weighted_sum_of_updates": distance}
    write_report(out, "combine_report.json", report)
    log(f"combined {len(loaded)} adapters with {spec.method}: rank {new.r} -> {out}")
    if spec.method in EQUAL_RANKS:
        log(f"note: {spec.method} weights A and B separately, so the result is not the weighted sum of the "
            f"updates (relative distance {distance:.3g}); cat and svd blend the updates themselves")
    elif spec.method == "cat" and distance > 1e-5:
        raise ParityError(f"{out}: cat did not reproduce the weighted sum of updates ({distance:.3g})")
    return report
