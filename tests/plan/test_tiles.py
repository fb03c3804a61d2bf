"""`train.mlp_tile_tokens: auto`: the plan picks no tiles when the step fits, else the largest
tile that fits the memory there is (finetune.plan.tiles), on the bundled 12B config; `train`
resolves it from the memory free before the base loads."""

from __future__ import annotations

import pytest

from finetune.config.recipe import load_recipe, with_overrides
from finetune.plan.report import plan
from finetune.plan.tiles import choose_mlp_tile, planned_peak_gib, tile_candidates

RECIPE = "recipes/gemma4-12b/mixed-image-audio-text.yaml"


def test_candidates_halve_in_whole_steps():
    assert tile_candidates(16384) == [0, 8192, 4096, 2048, 1024, 512, 256]
    assert tile_candidates(3000) == [0, 1280, 512, 256]
    assert tile_candidates(300) == [0]


@pytest.mark.parametrize("budget", [30.0, 15.4, 15.0, 1.0])
def test_auto_is_the_largest_tile_that_fits(budget):
    recipe = load_recipe(RECIPE, ["data.max_seq_len=16384", "train.attention=blocked", "train.mlp_tile_tokens=auto"])
    peaks = {t: planned_peak_gib(with_overrides(recipe, [f"train.mlp_tile_tokens={t}"]))
             for t in tile_candidates(16384)}
    assert peaks[0] > peaks[8192] > peaks[256]  # tiles save memory, smaller ones more
    tile, peak = choose_mlp_tile(recipe, budget)
    fitting = [t for t, p in peaks.items() if p <= budget]
    assert (tile, peak) == ((fitting[0], peaks[fitting[0]]) if fitting else (256, peaks[256]))
    p = plan(recipe, budget_gib=budget)
    assert p["peak_gib"] == round(peak, 3)
    assert p["assumptions"]["mlp_tile_tokens"].startswith(f"train.mlp_tile_tokens auto: {tile or 'untiled'} ")


def test_a_run_resolves_auto_from_free_memory(tiny_base, demo_data, tmp_path):
    """On the CPU the tiny model fits the host's memory untiled: auto trains exactly as 0."""
    from finetune.config.recipe import recipe_from_dict
    from finetune.training.loop import train

    def run(tile, name):
        logged = []
        r = recipe_from_dict({"model": {"base": str(tiny_base), "quantization": "none"},
                              "datasets": [{"path": str(demo_data / "train_text.jsonl")}],
                              "data": {"max_seq_len": 256, "cache_dir": str(tmp_path / "cache")},
                              "train": {"output_dir": str(tmp_path / name), "max_steps": 2, "batch_size": 2,
                                        "mlp_tile_tokens": tile, "gradient_checkpointing": False}})
        return train(r, log=logged.append), logged

    auto, logged = run("auto", "auto")
    assert any(line.startswith("train.mlp_tile_tokens auto: untiled (planned ") for line in logged), logged
    assert auto.losses == run(0, "zero")[0].losses
