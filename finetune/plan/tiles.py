"""`train.mlp_tile_tokens: auto`: the MLP tile the plan picks for the memory there is.

Tiling costs one extra MLP forward per layer and the fewer tiles the less overhead, so the
choice is: no tiles when the step fits untiled, else the largest tile (halving the sequence,
in multiples of TILE_STEP tokens) whose planned peak fits; when none does, the smallest (the
run may still fail; `finetune plan` says by how much). The same plan `finetune plan` prints.
"""

from __future__ import annotations

TILE_STEP = 256  # tiles are multiples of this many tokens (the CE chunk and kernel tile sizes)


def tile_candidates(seq_len: int) -> list[int]:
    """0 (untiled), then tiles from half the sequence down to TILE_STEP, halving."""
    out, tile = [0], (seq_len // 2) // TILE_STEP * TILE_STEP
    while tile >= TILE_STEP:
        out.append(tile)
        tile = (tile // 2) // TILE_STEP * TILE_STEP
    return out


def choose_mlp_tile(recipe, budget_gib: float, *, device: str = "cuda", gpus: int = 1,
                    strategy: str = "ddp") -> tuple[int, float]:
    """(tile, its planned peak GiB) for `budget_gib`: see the module docstring."""
    from finetune.config.recipe import with_overrides

    peak_of = _peak_of(recipe, device=device, gpus=gpus, strategy=strategy)
    tried = []
    for tile in tile_candidates(recipe.data.max_seq_len):
        peak = peak_of(with_overrides(recipe, [f"train.mlp_tile_tokens={tile}"]))
        tried.append((tile, peak))
        if peak <= budget_gib:
            return tile, peak
    return tried[-1]


def planned_peak_gib(recipe, *, device: str = "cuda", gpus: int = 1, strategy: str = "ddp") -> float:
    """The planned peak alone (`finetune plan`'s figure, without its suggestions)."""
    return _peak_of(recipe, device=device, gpus=gpus, strategy=strategy)(recipe)


def _peak_of(recipe, *, device: str, gpus: int, strategy: str):
    """recipe -> planned peak GiB, for recipes that differ from `recipe` in train keys only: the
    base's skeleton and the objective's step are built once."""
    from finetune.plan.estimate import GIB
    from finetune.plan.sharded import sharded, step_estimator
    from finetune.plan.skeleton import load_config, skeleton

    config, source = load_config(recipe.model)
    sk = skeleton(config, source)
    step = sharded(step_estimator(recipe, config), gpus, strategy)
    return lambda r: sum(step(r, sk, device)["items"].values()) / GIB


def resolved(recipe, budget_gib: float, **where) -> tuple[object, str | None]:
    """(recipe with `auto` replaced by the chosen tile, a line saying so), or (recipe, None)."""
    from finetune.config.recipe import with_overrides

    if recipe.train.mlp_tile_tokens != "auto":
        return recipe, None
    tile, peak = choose_mlp_tile(recipe, budget_gib, **where)
    fits = "fits" if peak <= budget_gib else "does not fit, the smallest tile"
    line = (f"train.mlp_tile_tokens auto: {tile or 'untiled'} (planned {peak:.2f} GiB of {budget_gib:.2f} GiB; "
            f"{fits})")
    return with_overrides(recipe, [f"train.mlp_tile_tokens={tile}"]), line
