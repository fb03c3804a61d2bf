"""FSDP2 on 2 CPU processes (gloo), launched as users launch it (`accelerate launch --config_file
configs/accelerate/fsdp2.yaml`): SFT (packing, gradient checkpointing, chunked CE), DPO and
QLoRA (NF4 with bf16 storage) equal one process on the same global batches; a run killed and
resumed equals the straight one; the shipped configs and the refusals.

The reference is one process taking the same micro-batches the two ranks take (rank 0's, then
rank 1's share of each global batch, accumulated by the loop's own `optimizer_step`): the same
sums in the same order, so without gradient clipping the adapters are bit-identical. With
clipping the gradient norm is summed shard by shard: see `test_clipping_across_shards`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from finetune.errors import RecipeErrors, UserError

ROOT = Path(__file__).resolve().parents[2]
FSDP2 = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
STEPS = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_base, demo_data):
    from tests.training.test_preference_train import write_pairs

    root = tmp_path_factory.mktemp("fsdp")
    return SimpleNamespace(root=root, base=tiny_base, data=Path(demo_data), pairs=write_pairs(root, demo_data))


def sft_raw(assets, name: str, **train) -> dict:
    return {
        "model": {"base": str(assets.base), "quantization": "none"},
        "datasets": [{"path": str(p), "format": "messages"} for p in sorted(assets.data.glob("train_*.jsonl"))],
        "data": {"max_seq_len": 256, "image_tokens": 70, "cache_dir": str(assets.root / "cache")},
        "lora": {"r": 8, "alpha": 16, "targets": ["attention", "mlp", "vision", "audio"]},
        "train": {"output_dir": str(assets.root / name), "batch_size": 2, "lr": 1e-3, "seed": 0, "warmup": 1,
                  "max_steps": STEPS, "packing": True, "gradient_checkpointing": True, "chunked_ce": True,
                  "max_grad_norm": 0.0, **train},
    }


def dpo_raw(assets, name: str, **train) -> dict:
    return {"model": {"base": str(assets.base), "quantization": "none"},
            "datasets": [{"path": str(assets.pairs), "format": "preference"}],
            "data": {"max_seq_len": 256, "image_tokens": 70, "cache_dir": str(assets.root / "cache")},
            "lora": {"r": 8, "alpha": 16, "targets": ["attention", "mlp", "vision", "audio"]},
            "train": {"objective": "dpo", "output_dir": str(assets.root / name), "batch_size": 1, "lr": 5e-3,
                      "seed": 0, "max_steps": 3, "group_by_length": False, "max_grad_norm": 0.0, **train}}


def launch(assets, raw: dict, *args: str, wait: bool = True, config: Path = FSDP2, **env):
    """`accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 -m
    finetune.cli train RECIPE` (or another shipped `config`)."""
    path = assets.root / f"{Path(raw['train']['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
           "--main_process_port", str(29500 + os.getpid() % 1000), "-m", "finetune.cli", "train", str(path), *args]
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                    HF_HOME=str(assets.root / "hf"), **env)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if not wait:
        return proc
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-4000:]
    assert ("adapter gathered from 2 shards (FSDP2)" if config == FSDP2 else "adapter identical on 2 ranks") in out
    return out


def one_process(raw: dict, world: int = 2):
    """The reference: one process, each step the `world` ranks' micro-batches in rank order,
    through the loop's own pieces (same seeds, same order of RNG use as `train`)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from data_tools.pipeline import prepare
    from finetune import objectives
    from finetune.config.recipe import recipe_from_dict
    from finetune.model.load import base_family, load_processor, load_recipe_base
    from finetune.training.batches import BatchPlan
    from finetune.training.optim import make_optimizer, make_scheduler
    from finetune.training.step import optimizer_step
    from finetune.training.wrappers import LossForward

    recipe = recipe_from_dict(raw)
    t = recipe.train
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(t.seed)
    family = base_family(recipe.model.base)
    processor = load_processor(recipe.model.base, recipe.data.image_tokens)
    data = prepare(recipe, processor, recipe.model.base, chat=family.chat, rejects_path=out / "rejects.jsonl",
                   log=None)
    model = load_recipe_base(recipe.model, "cpu")
    if t.gradient_checkpointing:
        from finetune.model.load import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    objective = objectives.build(recipe)
    pad = processor.tokenizer.pad_token_id
    plans = [BatchPlan(data.train, t, pad, model.config.get_text_config(), world, r, recipe.data.max_seq_len,
                       objective.collate, objective.pack) for r in range(world)]
    set_seed(t.seed)
    model = objective.setup(model, family)
    if t.attention != "sdpa":  # as the loop switches them (finetune.training.loop)
        from finetune.model.attention import set_attention

        set_attention(model, t.attention, t.attention_block_rows)
    if t.tile_attention:
        from finetune.model.tiled_attention import tile_attention

        tile_attention(model, t.attention_block_rows, family.attention_blocks)
    model.train()
    optimizer = make_optimizer(model.parameters(), t, "cpu")
    scheduler = make_scheduler(optimizer, t)
    acc, wrapped = Accelerator(cpu=True), LossForward(model, objective)
    losses = [optimizer_step(wrapped, optimizer, scheduler, [plans[r].micro_batch(s) for r in range(world)], acc,
                             objective, t.max_grad_norm)[0] for s in range(t.max_steps)]
    objective.save(model, out / "adapter")
    return losses, out / "adapter"


def losses_of(out: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


def adapter_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys()  # the same PEFT layout as one process writes
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def check_parity(sharded: Path, losses: list[float], adapter: Path, label: str) -> None:
    # Losses: each rank's summed loss is reduced across ranks as a float32 tensor (the reference
    # sums Python floats): |loss| < 10 makes that rounding < 10 × 2^-23 ≈ 1.2e-6; 1e-5 bounds it.
    got = losses_of(sharded)
    diffs = [abs(got[s + 1] - x) for s, x in enumerate(losses)]
    assert max(diffs) <= 1e-5, (label, got, losses)
    # Adapters: bit-identical (see the module docstring).
    diff = adapter_diff(sharded / "adapter", adapter)
    assert diff == 0.0, (label, diff)
    print(f"{label}: losses {[round(x, 6) for x in losses]}, max loss diff {max(diffs):.2e}, adapter diff {diff}")


@pytest.fixture(scope="module")
def straight(assets):
    """The FSDP2 SFT run every other test compares with: checkpoints every 2 steps, the eval loss
    (through the sharded model) and the best adapter kept at steps 2 and 4."""
    raw = sft_raw(assets, "fsdp-sft", save_every=2, eval_every=2, keep_best=True)
    raw["eval_datasets"] = [{"path": str(assets.data / "eval.jsonl"), "format": "messages"}]
    launch(assets, raw)
    return raw


@pytest.mark.slow
def test_fsdp2_sft_equals_one_process(assets, straight):
    """Packing, gradient checkpointing, chunked CE; the adapter saved in the single-process layout."""
    losses, adapter = one_process(sft_raw(assets, "one-sft"))
    out = Path(straight["train"]["output_dir"])
    check_parity(out, losses, adapter, "sft")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config == json.loads((adapter / "adapter_config.json").read_text())
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert [r["step"] for r in evals] == [2, 4] and all(0 < r["eval_loss"] < 20 for r in evals)
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["eval_loss"] == min(r["eval_loss"] for r in evals)
    adapter_diff(out / "best", adapter)  # the same PEFT layout
    ck = out / "checkpoints" / f"step-{STEPS}"
    assert json.loads((ck / "trainer_state.json").read_text())["optimizer_format"] == "fqn"
    assert adapter_diff(ck / "adapter", out / "adapter") == 0.0


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (torchrun's agent starts the ranks in
    sessions of their own), each by its id."""
    import psutil

    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_fsdp2_resume_after_sigkill_equals_straight(assets, straight):
    """Killed (every process) in the middle of writing the step-4 checkpoint: the gathered
    adapter is on disk, the optimizer state not yet (FINETUNE_TEST_SLOW_SAVE pauses there)."""
    raw = {**straight, "train": {**straight["train"], "output_dir": str(assets.root / "fsdp-killed")}}
    ck = Path(raw["train"]["output_dir"]) / "checkpoints"
    proc = launch(assets, raw, wait=False, FINETUNE_TEST_SLOW_SAVE="4:300")
    t0 = time.time()
    while not (ck / "step-4.tmp" / "adapter" / "adapter_model.safetensors").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < 600
        time.sleep(0.02)
    kill_all(proc)
    assert (ck / "step-2" / "COMPLETE").exists() and not (ck / "step-4").exists()
    out = ck.parent
    log = launch(assets, raw, "--resume")
    assert f"continuing from {ck / 'step-2'} (step 2)" in log
    ref = Path(straight["train"]["output_dir"])
    assert losses_of(out) == losses_of(ref)
    assert losses_of(out, "eval_loss") == losses_of(ref, "eval_loss")  # step 4's eval, after the resume
    assert adapter_diff(out / "adapter", ref / "adapter") == 0.0


@pytest.mark.slow
def test_fsdp2_dpo_equals_one_process(assets):
    """DPO: the reference pass (adapter off) and the policy pass both inside the sharded forward."""
    launch(assets, dpo_raw(assets, "fsdp-dpo"))
    losses, adapter = one_process(dpo_raw(assets, "one-dpo"))
    check_parity(assets.root / "fsdp-dpo", losses, adapter, "dpo")


@pytest.mark.slow
def test_fsdp2_qlora_with_bf16_storage_equals_one_process(assets):
    """NF4 weights stored as bf16 are sharded like any weight and all-gathered back bit for bit:
    the sharded run equals one process (bitsandbytes' CPU kernels)."""
    model = {"base": str(assets.base), "quantization": "nf4", "quant_storage": "bf16"}
    launch(assets, {**sft_raw(assets, "fsdp-qlora", max_steps=2), "model": model})
    losses, adapter = one_process({**sft_raw(assets, "one-qlora", max_steps=2), "model": model})
    check_parity(assets.root / "fsdp-qlora", losses, adapter, "qlora")


@pytest.mark.slow
def test_fsdp2_with_tiled_blocked_attention_equals_one_process(assets):
    """What fits the 12B at 32k on 4 × 16 GB: the blocked attention with lazy packed masks and the
    attention tiles, inside the sharded decoder layers (tiles of 32 tokens on 256-token rows)."""
    tiles = {"max_steps": 2, "attention": "blocked", "tile_attention": True, "attention_block_rows": 32}
    launch(assets, sft_raw(assets, "fsdp-tiled", **tiles))
    losses, adapter = one_process(sft_raw(assets, "one-tiled", **tiles))
    check_parity(assets.root / "fsdp-tiled", losses, adapter, "tiled")


@pytest.mark.slow
def test_fsdp2_accumulation_equals_ddp(assets):
    """`train.grad_accum: 2`: FSDP2 skips the reduce-scatter until the window's last micro-batch,
    as DDP skips its all-reduce (each rank sums its own micro-batches, then the ranks' sums are
    added): the same sums in the same order, so the same adapter bit for bit. The DDP run is
    launched with the shipped configs/accelerate/ddp.yaml."""
    launch(assets, sft_raw(assets, "fsdp-accum", max_steps=2, grad_accum=2))
    launch(assets, sft_raw(assets, "ddp-accum", max_steps=2, grad_accum=2), config=FSDP2.parent / "ddp.yaml")
    fsdp, ddp = assets.root / "fsdp-accum", assets.root / "ddp-accum"
    assert losses_of(fsdp) == pytest.approx(losses_of(ddp), abs=1e-5)  # float32-reduced metrics, as above
    diff = adapter_diff(fsdp / "adapter", ddp / "adapter")
    assert diff == 0.0, diff
    print("accumulation: fsdp vs ddp adapter diff", diff)


@pytest.mark.slow
def test_clipping_across_shards(assets):
    """With clipping the norm is summed shard by shard, in another order than one process sums it:
    the clip factor may differ by a few float32 roundings (relative < 1e-6). After one step each
    weight moved by lr × (clipped Adam step), so the adapters differ by at most lr × 1e-6 plus one
    rounding of the weight itself (2^-23 relative)."""
    lr = 1e-3
    raw = sft_raw(assets, "fsdp-clip", max_steps=1, max_grad_norm=1.0, lr=lr)
    launch(assets, raw)
    losses, adapter = one_process(sft_raw(assets, "one-clip", max_steps=1, max_grad_norm=1.0, lr=lr))
    from safetensors.torch import load_file

    x = load_file(str(assets.root / "fsdp-clip" / "adapter" / "adapter_model.safetensors"))
    y = load_file(str(adapter / "adapter_model.safetensors"))
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=2**-23, atol=lr * 1e-6)
    print("clip: max diff", max(float((x[k] - y[k]).abs().max()) for k in x))


# ---------------------------------------------------------------- refusals (no launch)


def test_fsdp_refuses_what_it_cannot_shard(make_recipe):
    from finetune.plan.checks import sharding_problems

    recipe = make_recipe([{"path": "x.jsonl"}], model={"quantization": "nf4"},
                         train={"optimizer": "paged_adamw8bit", "preview_every": 5})
    with pytest.raises(RecipeErrors) as e:
        sharding_problems(recipe)
    assert [x.where for x in e.value.errors] == ["model.quant_storage", "train.optimizer", "train.preview_every"]
    assert e.value.errors[0].fix == "Set model.quant_storage: bf16"
    assert "adamw" in e.value.errors[1].fix
    with pytest.raises(RecipeErrors) as e:
        sharding_problems(make_recipe([{"path": "x.jsonl"}], model={"quantization": "int8"},
                                      train={"optimizer": "adamw8bit"}))
    assert [x.where for x in e.value.errors] == ["model.quantization", "train.optimizer"]
    sharding_problems(make_recipe([{"path": "x.jsonl"}], model={"quantization": "nf4", "quant_storage": "bf16"}))
    # GRPO shards; its assisted rollouts (the drafter) don't
    grpo = {"objective": "grpo"}
    sharding_problems(make_recipe([{"path": "x.jsonl"}], train=grpo, grpo={"rewards": [{"name": "exact_match"}]}))
    with pytest.raises(RecipeErrors) as e:
        sharding_problems(make_recipe([{"path": "x.jsonl"}], train=grpo, drafter={"path": "d"},
                                      grpo={"rewards": [{"name": "exact_match"}]}))
    assert [x.where for x in e.value.errors] == ["drafter.path"]
    assert "launch with DDP (configs/accelerate/ddp.yaml)" in e.value.errors[0].fix


def test_fsdp1_is_refused(monkeypatch):
    from finetune.training.sharding import fsdp_plugin

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError) as e:
        fsdp_plugin()
    assert e.value.where == "accelerate config" and "fsdp2.yaml" in e.value.fix
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_plugin().fsdp_version == 2
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert fsdp_plugin() is None


@pytest.mark.slow
def test_accelerate_launch_without_multi_gpu_is_refused(tmp_path, tiny_base, demo_data):
    """`accelerate launch --num_processes 2` (no --multi_gpu, no config) starts ONE process: refused."""
    raw = {"model": {"base": str(tiny_base), "quantization": "none"},
           "datasets": [{"path": str(Path(demo_data) / "train_text.jsonl"), "format": "messages"}],
           "data": {"cache_dir": str(tmp_path / "cache")}, "train": {"output_dir": str(tmp_path / "out")}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "-m", "finetune.cli",
           "train", str(path)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("error: accelerate launch: asked for 2 processes but started one (without --multi_gpu accelerate "
            "runs a single process).") in proc.stderr
    assert not (tmp_path / "out" / "adapter").exists()


def test_merge_under_fsdp_or_several_processes_is_refused(monkeypatch, tmp_path, capsys):
    from finetune.cli.main import main

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: merge: started under FSDP: merge runs in one process") and "torchrun" in err
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 2
    assert "started under 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_a_sharded_checkpoint_resumes_only_under_fsdp(tmp_path):
    """Its optimizer state is keyed by parameter name: refused (with the fix) without FSDP."""
    from safetensors.torch import save_file

    from finetune.training.checkpoint import STATE_JSON, STATE_TENSORS, load_checkpoint

    ck = tmp_path / "step-2"
    ck.mkdir()
    (ck / STATE_JSON).write_text(json.dumps({"step": 2, "position": 2, "optimizer_format": "fqn"}))
    save_file({"x": torch.zeros(1)}, str(ck / STATE_TENSORS))
    with pytest.raises(UserError) as e:
        load_checkpoint(ck, torch.nn.Linear(2, 2), None, None)
    assert e.value.line() == (f"{ck}: written by a run launched with FSDP, resumed launched without FSDP: its "
                              "optimizer state is laid out for that. Resume it the way it was launched (the "
                              "adapter in it loads anywhere).")
