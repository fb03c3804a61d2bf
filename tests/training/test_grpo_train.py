"""GRPO on the shared engine: a run logs its metrics, resumes exactly (mid-way through a batch
of rollouts reused for `iterations` steps, the sampling RNG and the reference's log-probs
included), the recipe's mistakes come all at once, and the 12B plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.config.recipe import recipe_from_dict
from finetune.errors import RecipeErrors


def raw(demo_data, root: Path, name: str, grpo=None, **train) -> dict:
    return {"model": {"base": str(root.parent / "base"), "quantization": "none"},
            "datasets": [{"path": str(demo_data / f"train_{m}.jsonl")} for m in ("image", "audio", "text")],
            "eval_datasets": [{"path": str(demo_data / "eval.jsonl")}],
            "data": {"max_seq_len": 256, "image_tokens": 70, "cache_dir": str(root / "cache")},
            "lora": {"r": 8, "alpha": 16, "targets": ["attention", "mlp", "vision", "audio"]},
            "train": {"objective": "grpo", "output_dir": str(root / name), "batch_size": 2, "lr": 5e-3, "seed": 0,
                      "max_steps": 3, "group_by_length": False, "scheduler": "constant", **train},
            # a random base is never right: the length bonus (a user function) gives the groups a spread
            "grpo": {"group_size": 4, "max_new_tokens": 5, "rewards": [
                {"name": "exact_match"}, {"name": "tests.objectives.grpo_rewards_user:length_bonus", "weight": 0.5}],
                     **(grpo or {})}}


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_base):
    r = tmp_path_factory.mktemp("grpo-train") / "runs"
    r.mkdir()
    (r.parent / "base").symlink_to(tiny_base)
    return r


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_mid_iterations_equals_straight(root, demo_data):
    """iterations 2, two micro-batches a step, KL on: stopped after step 1 (its rollouts still to
    be reused by step 2), resumed to step 3, equal to the straight run."""
    from safetensors.torch import load_file

    from finetune.training.loop import train

    kw = {"grad_accum": 2, "save_every": 1}
    g = {"iterations": 2, "beta": 0.04}
    straight = train(recipe_from_dict(raw(demo_data, root, "straight", g, **kw)))
    out = root / "resumed"
    train(recipe_from_dict(raw(demo_data, root, out.name, g, **(kw | {"max_steps": 1}))))
    resumed = train(recipe_from_dict(raw(demo_data, root, out.name, g, **kw)), resume=True)
    assert resumed.losses == pytest.approx(straight.losses[1:], abs=1e-7)
    a, b = metrics_of(root / "straight"), metrics_of(out)
    for key in ("reward", "completion_length", "kl", "clip_ratio", "rewards/exact_match/mean"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=1e-7), key
    # step 2 reused step 1's rollouts: the same rewards, while the policy moved (KL > 0)
    assert a[1]["reward"] == a[0]["reward"] and a[1]["completion_length"] == a[0]["completion_length"]
    assert a[1]["kl"] > 0
    sa = load_file(str(root / "straight" / "adapter" / "adapter_model.safetensors"))
    sb = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_metrics_of_a_run(root, demo_data):
    from finetune.training.loop import train

    train(recipe_from_dict(raw(demo_data, root, "metrics", max_steps=1)))
    (row,) = metrics_of(root / "metrics")
    for key in ("reward", "reward_std", "rewards/exact_match/mean", "rewards/exact_match/std",
                "rewards/tests.objectives.grpo_rewards_user:length_bonus/mean", "completion_length", "clip_ratio", "kl", "rollout/tokens_per_s",
                "rollout/tokens_per_forward"):
        assert key in row, key
    assert 1 <= row["completion_length"] <= 5  # at most max_new_tokens
    assert row["tokens"] == 2 * 4  # weight: the step's completions (loss_type grpo)
    assert 0 < row["rollout/tokens_per_forward"] <= 1  # batched sampling: one token per row-forward at best
    assert row["clip_ratio"] == 0 and row["kl"] == 0  # one update per rollout, no KL term


def test_eval_reports_the_mean_reward_by_modality(root, demo_data):
    """The rewards of the greedy answers: their exact-match part is `finetune eval`'s exact match."""
    from finetune.eval.evaluate import evaluate_adapter
    from finetune.training.loop import train

    r = recipe_from_dict(raw(demo_data, root, "eval", max_steps=1))
    train(r)
    result, items = evaluate_adapter(r, root / "eval" / "adapter")
    rewards = result["rewards"]
    assert set(rewards["adapter"]) == {"image", "audio", "text", "all"}
    for side in ("base", "adapter"):
        for m, g in result["by_modality"].items():
            got = rewards[side][m]
            assert got["n"] == g["n"] and got["exact_match"] == g["metrics"]["exact_match"][side]
            bonus = [min(len(it[side]), 10) / 10 for it in result["items"] if it["modality"] == m]
            assert got["reward"] == pytest.approx(got["exact_match"] + 0.5 * sum(bonus) / len(bonus), abs=1e-4)


def test_recipe_mistakes_come_at_once(root, demo_data):
    bad = raw(demo_data, root, "bad", {"group_size": 1, "epsilon": 0.3, "epsilon_high": 0.2,
                                       "rewards": [{"name": "regex"}, {"name": "exactmatch"},
                                                   {"name": "regex", "pattern": "(a"}]}, eval_every=5)
    with pytest.raises(RecipeErrors) as e:
        recipe_from_dict(bad)
    where = sorted(x.where for x in e.value.errors)
    assert where == ["grpo.group_size"], where  # type/range errors first; the objective's checks need a valid recipe
    bad["grpo"]["group_size"] = 2
    with pytest.raises(RecipeErrors) as e:
        recipe_from_dict(bad)
    assert sorted(x.where for x in e.value.errors) == ["grpo.epsilon_high", "grpo.rewards[0].pattern",
                                                       "grpo.rewards[1].name", "grpo.rewards[2].pattern",
                                                       "train.eval_every"]


def test_the_12b_plan_fits_16_gib():
    """recipes/gemma4-12b/grpo.yaml: group 8 × 512 new tokens after a 768-token prompt. The rollout
    KV cache by hand: 40 sliding layers keep their 1024-token window, 8 kv heads of 256 (k and v,
    bf16): 8 rows × 1024 × 2 × 8 × 256 × 2 B = 64 MiB each; 8 full layers every one of the 1280
    tokens, 1 kv head of 512: 8 × 1280 × 2 × 512 × 2 B = 20 MiB each; 2,720 MiB in all."""
    from finetune.config.recipe import load_recipe
    from finetune.plan.report import plan

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "gemma4-12b" / "grpo.yaml")
    p = plan(recipe, budget_gib=16.0)
    assert p["fits"] and p["peak_gib"] <= 16.0
    g = p["assumptions"]["grpo"]
    assert (g["rows"], g["seq_len"]) == (8, 1280) and set(g["phases_gib"]) == {"rollouts", "policy step"}
    with_kl = plan(recipe_from_dict({**recipe.to_dict(), "grpo": {**recipe.to_dict()["grpo"], "beta": 0.04}}))
    assert "reference forward" in with_kl["assumptions"]["grpo"]["phases_gib"]
    from finetune.grpo.plan import estimate_grpo
    from finetune.plan.skeleton import load_config, skeleton

    config, source = load_config(recipe.model)
    est = estimate_grpo(recipe, skeleton(config, source), "cuda", config)
    phases = est["grpo"]["phases_gib"]
    assert phases["rollouts"] < phases["policy step"]
    assert est["grpo"]["rollout_kv_cache_bytes"] == 40 * 64 * 2**20 + 8 * 20 * 2**20 == 2720 * 2**20
    # the rollout phase's own items are not in the peak's breakdown (the policy step is larger)
    assert "rollout_kv_cache" not in p["breakdown"]


def test_rollouts_with_a_drafter(root, demo_data, tiny_base):
    """`drafter.path` set: each completion is sampled with assisted generation (one row at a time),
    so a target forward yields at least one token; batched sampling yields at most one per row."""
    from finetune.demo.tiny_drafter import write_tiny_drafter
    from finetune.training.loop import train

    drafter = write_tiny_drafter(tiny_base, root / "tiny-drafter")
    train(recipe_from_dict({**raw(demo_data, root, "assisted", max_steps=1),
                            "drafter": {"path": str(drafter), "num_tokens": 3}}))
    (row,) = metrics_of(root / "assisted")
    assert row["rollout/tokens_per_forward"] >= 1 and 1 <= row["completion_length"] <= 5


@pytest.mark.slow
def test_the_grpo_demo_runs(tmp_path):
    """The whole demo, shortened: SFT, eval, drafter distil and align, rollout speed, GRPO, eval."""
    from finetune.workflows.grpo import run_grpo_demo

    scores = run_grpo_demo(["train.max_steps=1", "train.batch_size=2", "grpo.group_size=2"],
                           root=tmp_path / "runs/demo-grpo")
    assert set(scores["exact_match"]["grpo"]) == {"image", "audio", "text"}
    speed = scores["rollout_speed"]
    assert speed["prompts"] == 12
    for setting in ("served", "fixed"):
        assert all(0 < speed[setting][k]["tokens"] <= 12 * 2 * 16 for k in ("plain", "drafter"))
    assert json.loads((tmp_path / "runs/demo-grpo/eval.json").read_text()) == scores
    # Its replies are sentences with the answer first (the drafter's tokens to draft).
    rows = (tmp_path / "runs/demo-grpo/data/eval.jsonl").read_text().splitlines()
    answers = {json.loads(r)["messages"][-1]["content"] for r in rows}
    assert {"red is the answer.", "high is the answer.", "Halden is the answer."} <= answers
    assert all(a.endswith(" is the answer.") for a in answers)
    # Its text task: the one city among the question's words, asked in sentences not trained on.
    from finetune.demo.data import CAPITALS

    def city_items(records):
        return [(r["messages"][1]["content"], r["messages"][2]["content"]) for r in records if "-text-" in r["id"]]

    train_text = (tmp_path / "runs/demo-grpo/data/train_text.jsonl").read_text().splitlines()
    train, held = city_items(map(json.loads, train_text)), city_items(map(json.loads, rows))
    assert (len(train), len(held)) == (192, 24)
    for question, answer in train + held:
        named = [w for w in question.split() if w in CAPITALS.values()]
        assert len(named) == 1, question
        assert question.startswith("Which city is named here: ") and answer == f"{named[0]} is the answer."
    assert not {q for q, _ in held} & {q for q, _ in train}
    assert sorted(a for _, a in held) == sorted([f"{c} is the answer." for c in CAPITALS.values()] * 3)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(root, demo_data, train_on_two_ranks):
    """torchrun, 2 ranks × 1 prompt vs one process × 2 prompts: each prompt samples under its own
    seed whatever rank it lands on and its group's advantages stay on that rank, so the losses
    agree and both ranks end with the same adapter."""
    import yaml

    from finetune.training.loop import train

    path = root / "ddp.yaml"
    path.write_text(yaml.safe_dump(raw(demo_data, root, "ddp", batch_size=1, max_steps=2, lr=1e-3)))
    train_on_two_ranks(path)
    one = train(recipe_from_dict(raw(demo_data, root, "ddp-one", batch_size=2, max_steps=2, lr=1e-3)))
    ddp, single = metrics_of(root / "ddp"), metrics_of(root / "ddp-one")
    # (on-policy the loss's value is -mean(advantage) = 0; what step 2 samples shows the update)
    assert [r["loss"] for r in ddp] == pytest.approx(one.losses, abs=1e-5)
    for key in ("reward", "completion_length", "rewards/tests.objectives.grpo_rewards_user:length_bonus/mean"):
        assert [r[key] for r in ddp] == pytest.approx([r[key] for r in single], abs=1e-6), key
    assert [r["tokens"] for r in ddp] == [r["tokens"] for r in single] == [8, 8]


def test_prompt_records_and_their_columns_reach_the_rewards(root, demo_data, tmp_path):
    """`format: prompt`: a picture with a string prompt and a chat prompt, each with a column the
    user reward reads; the step's mean of that reward is the columns' mean (each prompt's
    value repeated over its group). SFT refuses such data up front."""
    from finetune.training.loop import train

    data = tmp_path / "rl.jsonl"
    img = str(demo_data / "images" / "train_0000.png")
    rows = [{"prompt": "Which colour fills the picture?", "images": [img], "solution": "red", "difficulty": 1},
            {"prompt": [{"role": "user", "content": "What is the capital of Norvia?"}], "difficulty": 3}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = raw(demo_data, root, "prompt-format", max_steps=1)
    r["datasets"], r["eval_datasets"] = [{"path": str(data), "format": "prompt"}], []
    r["grpo"]["rewards"] = [{"name": "exact_match"}, {"name": "tests.objectives.grpo_rewards_user:echo_column"}]
    train(recipe_from_dict(r))
    (row,) = metrics_of(root / "prompt-format")
    assert row["rewards/tests.objectives.grpo_rewards_user:echo_column/mean"] == 2.0
    assert row["rewards/tests.objectives.grpo_rewards_user:echo_column/std"] > 0
    sft = {**r, "train": {**r["train"], "objective": "sft"}}
    sft.pop("grpo")
    with pytest.raises(RecipeErrors) as e:
        recipe_from_dict(sft)
    assert [(x.where, x.what) for x in e.value.errors] == [
        ("datasets[0].format", "prompt-only data has no answer to train objective 'sft' on")]
