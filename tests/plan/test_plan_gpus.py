"""`finetune plan --gpus N --strategy ddp|fsdp`: what each GPU holds when the run is split.

The sharded plan is arithmetic over the one-GPU plan (finetune.plan.sharded), so these check
its identities exactly: what FSDP2 splits is split N ways, what it gathers or keeps whole is
added once, activations don't change; DDP adds one copy of the LoRA gradients. The figures
are the bundled Gemma 4 12B config's (offline).
"""

from __future__ import annotations

import pytest

from finetune.config.recipe import load_recipe
from finetune.plan.estimate import quant_tensor_bytes
from finetune.plan.report import plan

RECIPE = "recipes/gemma4-12b/image-qa.yaml"
SHARDED = ("lora_weights", "lora_grads", "optimizer_states", "unquantized_weights")


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(RECIPE, ["data.max_seq_len=32768"])


@pytest.fixture(scope="module")
def plans(recipe):
    return {(n, s): plan(recipe, gpus=n, strategy=s) for n in (1, 2, 4) for s in ("ddp", "fsdp")}


def test_one_gpu_is_the_plain_plan(recipe, plans):
    assert plans[1, "fsdp"]["breakdown_bytes"] == plans[1, "ddp"]["breakdown_bytes"] == \
        plan(recipe)["breakdown_bytes"]


def test_fsdp_splits_weights_gradients_and_optimizer_state(recipe, plans):
    from finetune.plan.skeleton import load_config, skeleton

    one = plans[1, "fsdp"]["breakdown_bytes"]
    sk = skeleton(*load_config(recipe.model))
    m = recipe.model
    own_meta = [quant_tensor_bytes(n, out, m.quantization, m.double_quant, 2) for _, n, out in sk.quant_tensors]
    meta = sum(x for _, x in own_meta)
    for n in (2, 4):
        got = plans[n, "fsdp"]["breakdown_bytes"]
        for k in SHARDED:
            assert abs(got[k] - one[k] / n) <= 1, k  # bytes, rounded to int by the report
        # the 4-bit weights are split; their absmax and code tables stay whole on every GPU
        assert abs(got["linear_weights"] - (one["linear_weights"] - meta) / n - meta) <= 1
        # activations, the loss and the batch are per GPU as on one
        for k in ("layer_recompute", "attention_masks", "backward_transients", "batch_inputs"):
            assert got[k] == one[k], k
        assert got["fsdp_gathered_root"] == plans[2, "fsdp"]["breakdown_bytes"]["fsdp_gathered_root"]
    # the root unit gathered whole: the embedding tied to the head (1.007 B bf16) and the media embedders
    assert 1.007e9 * 2 <= plans[4, "fsdp"]["breakdown_bytes"]["fsdp_gathered_root"] <= 1.03e9 * 2


def test_ddp_adds_one_copy_of_the_lora_gradients(plans):
    one = plans[1, "ddp"]["breakdown_bytes"]
    for n in (2, 4):
        got = plans[n, "ddp"]["breakdown_bytes"]
        assert got["ddp_grad_buckets"] == one["lora_grads"]
        assert {k: v for k, v in got.items() if k not in ("ddp_grad_buckets", "allocator_slack")} == \
            {k: v for k, v in one.items() if k != "allocator_slack"}


def test_the_12b_at_32k_per_gpu_and_the_longest_that_fits(recipe, plans):
    peaks = {k: p["peak_gib"] for k, p in plans.items()}
    assert peaks[4, "fsdp"] < peaks[2, "fsdp"] < peaks[1, "fsdp"] < peaks[2, "ddp"]
    longest = {k: p["longest_seq_len"] for k, p in plans.items()}
    assert longest[2, "ddp"] <= longest[1, "ddp"] < longest[2, "fsdp"] < longest[4, "fsdp"] < 32768
    # the longest fits and 256 tokens more does not, per GPU of 4 under FSDP2
    for seq, fits in ((longest[4, "fsdp"], True), (longest[4, "fsdp"] + 256, False)):
        r = load_recipe(RECIPE, [f"data.max_seq_len={seq}"])
        assert plan(r, gpus=4, strategy="fsdp")["fits"] is fits
    print({f"{n}x{s}": (peaks[n, s], longest[n, s]) for n, s in plans})


def test_cli_prints_the_per_gpu_figure(capsys):
    from finetune.cli.main import main

    assert main(["plan", RECIPE, "data.max_seq_len=32768", "--gpus", "4", "--strategy", "fsdp"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("peak "))
    assert "GiB per GPU of 4 (FSDP2: sharded)  of a 16 GiB budget" in line
    assert "longest data.max_seq_len that fits 16 GiB: " in out and "fsdp_gathered_root" in out
    # the recipe stores its 4-bit weights as uint8: the plan says what training would refuse
    assert "  under FSDP train refuses model.quant_storage: uint8 storage under FSDP" in out
    assert main(["plan", RECIPE, "--gpus", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --gpus: 0 is not a number of GPUs")


def test_the_12b_recipes_state_their_plan_at_32k():
    """Each shipped 12B recipe's comment "N × 16 GB, FSDP2: X GiB per GPU (...)" is the plan's figure."""
    import re
    from pathlib import Path

    # GRPO's recipe is about rollouts at 768 + 512 tokens, not 32k rows: the other five state their plan
    recipes = sorted(p for p in Path("recipes/gemma4-12b").glob("*.yaml") if "objective: grpo" not in p.read_text())
    assert len(recipes) == 5
    pattern = re.compile(r"^#   (\d) × 16 GB, FSDP2: ([\d.]+) GiB per GPU \((fits|does not fit; ([\d,]+) tokens do)\)$",
                         re.M)
    for path in recipes:
        stated = pattern.findall(path.read_text())
        assert [int(n) for n, *_ in stated] == [2, 4], path
        r = load_recipe(str(path), ["data.max_seq_len=32768", "train.optimizer=adamw", "model.quant_storage=bf16",
                                    "train.attention=blocked", "train.tile_attention=true"])
        assert ("# data.max_seq_len=32768 train.optimizer=adamw model.quant_storage=bf16 train.attention=blocked\n"
                "# train.tile_attention=true --gpus N --strategy fsdp`") in path.read_text()
        for n, gib, verdict, longest in stated:
            p = plan(r, gpus=int(n), strategy="fsdp")
            assert f"{p['peak_gib']:.2f}" == gib and p["fits"] == (verdict == "fits"), (path, n)
            assert p["fits"] or int(longest.replace(",", "")) == p["longest_seq_len"], (path, n)
