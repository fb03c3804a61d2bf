"""The objectives with passes of their own under FSDP2 (2 processes on gloo, the shipped
configs/accelerate/fsdp2.yaml): GRPO, whose rollouts generate on the sharded policy, and drafter
alignment, whose drafter trains in the root unit, each against the same launch under ddp.yaml."""

from __future__ import annotations

import json

import pytest
import torch

from tests.training.test_fsdp import FSDP2, adapter_diff, assets, launch, losses_of  # noqa: F401 (fixture)


def grpo_raw(assets, name: str) -> dict:  # noqa: F811
    """The GRPO test run (tests/training/test_grpo_train.py): 1 prompt per rank, groups of 4."""
    from tests.training.test_grpo_train import raw

    # no clipping: its norm summed shard by shard rounds differently (test_clipping_across_shards),
    # and Adam's next step turns that rounding into up to 1e-5 on weights whose gradient is near 0
    r = raw(assets.data, assets.root, name, batch_size=1, max_steps=2, lr=1e-3, optimizer="adamw",
            max_grad_norm=0.0)
    r["model"]["base"] = str(assets.base)
    r["data"]["cache_dir"] = str(assets.root / "cache-grpo")
    return r


def drafter_raw(assets, name: str) -> dict:  # noqa: F811
    """The drafter-alignment test run (tests/drafter/test_drafter.py), 1 prompt per rank."""
    from tests.drafter.test_drafter import raw_recipe

    # no clipping: its norm over shards has a test of its own (test_clipping_across_shards)
    return raw_recipe(assets, name, objective="drafter", batch_size=1, max_steps=3, save_every=1,
                      group_by_length=False, optimizer="adamw", max_grad_norm=0.0)


@pytest.mark.slow
def test_fsdp2_grpo_equals_ddp(assets):  # noqa: F811
    """GRPO under FSDP2: each rank samples its prompt's group on the sharded policy (the root's
    weights gathered around the rollout, every rank's generation kept in step until all are
    done), then trains on it. Against the same launch with the shipped ddp.yaml: the same
    rewards and losses, and the same adapter bit for bit (the same sums in the same order)."""
    launch(assets, grpo_raw(assets, "fsdp-grpo"))
    launch(assets, grpo_raw(assets, "ddp-grpo"), config=FSDP2.parent / "ddp.yaml")
    fsdp, ddp = assets.root / "fsdp-grpo", assets.root / "ddp-grpo"
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (fsdp, ddp)]
    for key in ("loss", "reward", "completion_length", "rollout/tokens_per_forward"):
        assert [r[key] for r in rows[0]] == pytest.approx([r[key] for r in rows[1]], abs=1e-6), key
    assert len(rows[0]) == 2 and rows[0][1]["reward_std"] > 0  # step 2 sampled from the updated policy
    diff = adapter_diff(fsdp / "adapter", ddp / "adapter")
    assert diff == 0.0, diff
    print("grpo: fsdp vs ddp adapter diff", diff)


@pytest.mark.slow
def test_fsdp2_drafter_alignment_equals_ddp_and_resumes(assets):  # noqa: F811
    """The drafter objective under FSDP2: the frozen target sharded by layer, the drafter (its own
    weights, its embedding tied to its head) in the root unit. Against the same launch with
    ddp.yaml: the same losses and the same saved drafter; and resumed from its step-2 checkpoint
    (the drafter's weights and optimizer state split back into the shards) it ends the same."""
    import shutil

    from safetensors.torch import load_file

    launch(assets, drafter_raw(assets, "fsdp-drafter"))
    launch(assets, drafter_raw(assets, "ddp-drafter"), config=FSDP2.parent / "ddp.yaml")
    fsdp, ddp = assets.root / "fsdp-drafter", assets.root / "ddp-drafter"
    assert losses_of(fsdp) == pytest.approx(losses_of(ddp), abs=1e-6) and len(losses_of(fsdp)) == 3
    a, b = load_file(str(fsdp / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    init = load_file(str(assets.base / "drafter" / "model.safetensors"))
    for k in a:  # every weight moved (a tied embedding too), and alike: float32 summation order only
        assert not torch.equal(a[k], init[k]) or "layer_scalar" in k, k
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    final = {k: v.clone() for k, v in a.items()}
    shutil.rmtree(fsdp / "checkpoints" / "step-3")
    (fsdp / "model.safetensors").unlink()
    log = launch(assets, drafter_raw(assets, "fsdp-drafter"), "--resume")
    assert "(step 2)" in log
    again = load_file(str(fsdp / "model.safetensors"))
    assert max(float((again[k] - final[k]).abs().max()) for k in final) == 0.0
