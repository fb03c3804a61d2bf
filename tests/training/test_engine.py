"""The training engine: objectives as plug-ins, checkpoints that can't run code, resume past
the end, complete accounting with streaming previews, and a demo that can run twice."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from finetune.cli.main import main
from finetune.config.recipe import recipe_from_dict


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_base, demo_data):
    return SimpleNamespace(root=tmp_path_factory.mktemp("engine"), base=tiny_base, data=demo_data)


def raw_recipe(assets, name: str, *, data=None, datasets=None, **train) -> dict:
    d = Path(assets.data)
    return {
        "model": {"base": str(assets.base), "quantization": "none"},
        "datasets": datasets or [{"path": str(p)} for p in sorted(d.glob("train_*.jsonl"))],
        "data": {"max_seq_len": 256, "image_tokens": 70, "cache_dir": str(assets.root / "cache"), **(data or {})},
        "lora": {"r": 8, "alpha": 16, "targets": ["attention", "mlp", "vision", "audio"]},
        "train": {"output_dir": str(assets.root / name), "batch_size": 2, "lr": 1e-3, "seed": 0, **train},
    }


def test_a_toy_objective_trains_through_the_real_loop(assets):
    """A new objective is a class with `weight` and `loss`, registered under a name."""
    from finetune.model.load import unwrap
    from finetune.objectives import Objective, register
    from finetune.objectives.base import unregister
    from finetune.training.loop import train

    @register("toy_l2")
    class ToyL2(Objective):
        """Pull the last position's state after the first layer towards zero: one number per sample."""
        metrics = ("toy/norm",)

        def weight(self, batch):
            return batch["input_ids"].shape[0]

        def loss(self, model, batch):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            out = unwrap(model).model(**inputs, use_cache=False, output_hidden_states=True)
            # Not last_hidden_state: the final RMSNorm pins its mean square at 1 whatever LoRA does.
            per_sample = out.hidden_states[1][:, -1].float().pow(2).mean(-1)
            return per_sample.sum(), {"toy/norm": per_sample.detach().sqrt().sum()}

    out = assets.root / "toy"
    try:
        result = train(recipe_from_dict(raw_recipe(assets, "toy", objective="toy_l2", max_steps=6, lr=1e-2)))
    finally:
        unregister("toy_l2")
    assert len(result.losses) == 6 and result.losses[-1] < result.losses[0]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(r["toy/norm"] > 0 for r in rows)
    assert rows[0]["tokens"] == 2  # the objective's own weight: samples, not label tokens
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "step-6" / "trainer_state.json").is_file()


def test_an_unknown_objective_is_a_recipe_error(assets):
    from finetune.errors import RecipeErrors

    with pytest.raises(RecipeErrors) as e:
        recipe_from_dict(raw_recipe(assets, "x", objective="dpo-ish"))
    assert e.value.where == "train.objective" and "is not a training objective" in e.value.what


def test_resume_continues_past_the_end_exactly(assets):
    """8 steps, then --resume with max_steps 12 equals 12 straight (constant schedule)."""
    from finetune.training.loop import train

    straight = train(recipe_from_dict(raw_recipe(assets, "straight", max_steps=12, scheduler="constant")))
    first = raw_recipe(assets, "extended", max_steps=8, scheduler="constant")
    train(recipe_from_dict(first))
    ck = Path(first["train"]["output_dir"]) / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-8"]  # the final state, counted by keep
    first["train"]["max_steps"] = 12
    more = train(recipe_from_dict(first), resume=True)
    assert more.losses == pytest.approx(straight.losses[8:], abs=1e-6)
    rows = [json.loads(x) for x in (Path(first["train"]["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx(straight.losses, abs=1e-6)


def test_checkpoint_state_is_json_and_safetensors(assets):
    from safetensors.torch import load_file

    ck = Path(raw_recipe(assets, "extended")["train"]["output_dir"]) / "checkpoints" / "step-12"
    state = json.loads((ck / "trainer_state.json").read_text())
    tensors = load_file(str(ck / "trainer_state.safetensors"))
    assert state["step"] == 12 and state["position"] == 12
    assert any(k.endswith("exp_avg") for k in tensors) and "rng.torch" in tensors
    assert not any(p.suffix in (".pt", ".bin", ".pkl") for p in ck.rglob("*"))


def test_resume_refuses_a_pickled_state_and_runs_none_of_it(assets, tmp_path, capsys):
    """A crafted state.pt whose unpickling would run a command: exit 2 naming the file, and the
    command never runs."""
    import pickle

    raw = raw_recipe(assets, "crafted", max_steps=2)
    out = Path(raw["train"]["output_dir"])
    ck = out / "checkpoints" / "step-1"
    ck.mkdir(parents=True)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ck / "state.pt").write_bytes(pickle.dumps({"optimizer": Payload()}))
    (ck / "COMPLETE").write_text("1")
    shutil.copytree(Path(raw_recipe(assets, "toy")["train"]["output_dir"]) / "adapter", ck / "adapter")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"error: {ck / 'state.pt'}: checkpoint state stored as a pickle" in err
    assert "Traceback" not in err
    assert not marker.exists()


@pytest.mark.slow
def test_streaming_previews_keep_every_reject(assets, tmp_path):
    """streaming + eval_fraction + previews: every bad record of both splits is in rejects.jsonl
    once, and the count equals the rejections reported."""
    from finetune.training.loop import train

    good = [json.loads(x) for x in (Path(assets.data) / "train_text.jsonl").read_text().splitlines()]
    rows = [json.dumps(r) for r in good * 6]
    bad = ['{"messages": "not a list"}', "{not json", '{"messages": [{"role": "user", "content": "hi"}]}']
    for i, b in enumerate(bad):
        rows.insert(7 * i + 3, b)
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(rows) + "\n")
    raw = raw_recipe(assets, "stream-previews", datasets=[{"path": str(path)}],
                     data={"streaming": True, "eval_fraction": 0.3, "on_bad_record": "skip"},
                     max_steps=4, preview_every=2, preview_items=2)
    train(recipe_from_dict(raw))
    out = Path(raw["train"]["output_dir"])
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    stats = json.loads((out / "data_stats.json").read_text())
    reported = stats["total"]["rejected"] + (stats["eval"] or {}).get("rejected", 0)
    assert len(rejects) == reported == len(bad)
    assert sorted(r["origin"] for r in rejects) == sorted(f"{path}:{7 * i + 4}" for i in range(len(bad)))
    previews = [json.loads(x) for x in (out / "previews.jsonl").read_text().splitlines()]
    assert [p["step"] for p in previews] == [2, 2, 4, 4] and all(p["reference"] for p in previews)


@pytest.mark.slow
def test_the_demo_runs_twice(tmp_path):
    """The demo owns its folder: a second run replaces the first's outputs (merged/ included)
    instead of failing after training."""
    from finetune.workflows.demo import run_demo

    small = ["train.max_steps=2", "eval.max_items=3", "train.batch_size=4"]
    demo = tmp_path / "runs" / "demo"
    first = run_demo(small, root=demo)
    (demo / "stale.txt").write_text("left by an earlier run")
    second = run_demo(small, root=demo)
    assert first == second
    assert (demo / "merged" / "merge_report.json").is_file()
    assert not (demo / "stale.txt").exists()


def test_demo_data_of_another_version_is_written_again(tmp_path):
    """The GRPO demo's data (sentence replies) has a version of its own: a folder holding the
    one-word data an older checkout wrote there is rewritten, the current version's is kept."""
    from finetune.demo.data import DATA_VERSION
    from finetune.demo.grpo import DATA_VERSION as GRPO_VERSION
    from finetune.demo.grpo import GRPO_RECIPE
    from finetune.workflows.demo import demo_setup

    calls = []

    def make(folder, seed):
        calls.append(seed)
        (folder / "eval.jsonl").write_text("{}\n")

    root = tmp_path / "runs" / "demo-grpo"
    data = root / "data"
    data.mkdir(parents=True)
    (data / "eval.jsonl").write_text("{}\n")
    (data / ".demo_data_version").write_text(DATA_VERSION)
    assert GRPO_VERSION != DATA_VERSION
    for _ in range(2):
        demo_setup(GRPO_RECIPE, [], root, lambda *_: None, make, data_version=GRPO_VERSION)
    assert calls == [0]
    assert (data / ".demo_data_version").read_text() == GRPO_VERSION


def test_mlp_tiles_through_the_trainer_give_the_same_run(assets):
    """`train.mlp_tile_tokens` on a real run: same losses, same adapter tensors and names."""
    from safetensors.torch import load_file

    from finetune.training.loop import train

    runs = {}
    for tile in (0, 16):
        raw = raw_recipe(assets, f"tile-{tile}", max_steps=3, mlp_tile_tokens=tile, gradient_checkpointing=True)
        runs[tile] = (train(recipe_from_dict(raw)).losses,
                      load_file(str(Path(raw["train"]["output_dir"]) / "adapter" / "adapter_model.safetensors")))
    # The first loss is the same float32 forward in another summation order: a few ulps apart
    # (float32's relative rounding is 6e-8; 1e-6 is 16 of them).
    assert runs[16][0][0] == pytest.approx(runs[0][0][0], rel=1e-6)
    # Adam divides by sqrt(v): for near-zero gradients, summation-order noise becomes a visible
    # share of a step (lr 1e-3 here), so the weights agree to 1e-4 and the later losses to 1e-5
    # of their size (an absolute 1e-5 on losses near 7 failed on one 2-core CPU: 1.24e-5).
    assert runs[16][0] == pytest.approx(runs[0][0], rel=1e-5)
    assert runs[16][1].keys() == runs[0][1].keys()
    assert max(float((runs[16][1][k] - runs[0][1][k]).abs().max()) for k in runs[0][1]) < 1e-4


def test_epochs_best_checkpoint_and_early_stopping(assets):
    """train.epochs sets the steps from the data; keep_best keeps the lowest eval loss's adapter;
    early stopping ends the run when the eval loss stops improving; eval loss is logged."""
    from finetune.errors import RecipeErrors
    from finetune.training.loop import train

    d = Path(assets.data)
    evals = [{"path": str(d / "eval.jsonl")}]
    raw = raw_recipe(assets, "epochs", epochs=2, group_by_length=False)
    lines = []
    result = train(recipe_from_dict(raw), log=lines.append)
    n_train = sum(1 for p in d.glob("train_*.jsonl") for _ in p.read_text().splitlines())
    assert result.steps == 2 * (n_train // 2)  # batch 2, grad_accum 1, whole batches only
    assert any(f"train: 2 epoch(s) of {n_train // 2} micro-batches = {result.steps} steps" in x for x in lines)

    with pytest.raises(RecipeErrors) as e:
        recipe_from_dict(raw_recipe(assets, "x", epochs=1, max_steps=3))
    assert e.value.where == "train.epochs" and "both" in e.value.what

    # lr 0: the eval loss never improves after the first eval, so patience 2 stops at the third
    raw = raw_recipe(assets, "early", max_steps=20, lr=0.0, eval_every=2, keep_best=True,
                     early_stopping_patience=2)
    raw["eval_datasets"] = evals
    lines = []
    result = train(recipe_from_dict(raw), log=lines.append)
    out = Path(raw["train"]["output_dir"])
    assert result.steps == 6
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 2
    assert (out / "best" / "adapter_model.safetensors").is_file() and (out / "adapter").is_dir()
    evals_logged = [x for x in lines if "eval_loss" in x]
    assert len(evals_logged) == 3 and evals_logged[-1].endswith("no better for 2 evals: stopping early")
