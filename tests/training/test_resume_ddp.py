"""Exact resume after a real SIGKILL (also in the middle of a checkpoint save), and 2-process
DDP on CPU (gloo) through torchrun: same adapter on both ranks, same loss as one process
on the same global batch.

These start real `python -m finetune.cli.main train` processes, so they are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from finetune.training.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_base, demo_data):
    """The shared tiny base and demo data (tests/conftest.py), and a folder for the runs."""
    return SimpleNamespace(root=tmp_path_factory.mktemp("resume"), base=tiny_base, data=demo_data)


def write_recipe(assets, name: str, **train) -> tuple[Path, dict]:
    data = Path(assets.data)
    raw = {
        "model": {"base": str(assets.base), "quantization": "none"},
        "datasets": [{"path": str(p), "format": "messages"} for p in sorted(data.glob("train_*.jsonl"))],
        "eval_datasets": [{"path": str(data / "eval.jsonl"), "format": "messages"}],
        "data": {"max_seq_len": 256, "image_tokens": 70, "cache_dir": str(assets.root / "cache")},
        "lora": {"r": 8, "alpha": 16, "targets": ["attention", "mlp", "vision", "audio"]},
        "train": {"output_dir": str(assets.root / name), "batch_size": 2, "lr": 1e-3, "seed": 0,
                  "warmup": 1, **train},
    }
    path = assets.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", **extra)
    env.pop("FINETUNE_TEST_SLOW_SAVE", None)
    env.update(extra)
    return env


def start(recipe: Path, *args: str, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "finetune.cli", "train", str(recipe), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_when(proc: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as `path` exists (polled every 20 ms)."""
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def metrics(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows}


def adapter_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_resume_after_sigkill_is_exact(assets):
    from finetune.config.recipe import recipe_from_dict
    from finetune.training.loop import train

    steps = dict(max_steps=8, save_every=2)
    recipe, raw = write_recipe(assets, "killed", **steps)
    out = Path(raw["train"]["output_dir"])
    ck = out / "checkpoints"

    # 1. Killed right after the step-4 checkpoint is complete.
    kill_when(start(recipe), ck / "step-4" / "COMPLETE")
    assert latest_checkpoint(out).name == "step-4"

    # 2. Resumed, then killed in the middle of writing step 6: the adapter is on disk, the
    # optimizer state not yet (FINETUNE_TEST_SLOW_SAVE pauses there, see finetune.training.checkpoint).
    proc = start(recipe, "--resume", FINETUNE_TEST_SLOW_SAVE="6:300")
    kill_when(proc, ck / "step-6.tmp" / "adapter" / "adapter_model.safetensors")
    assert (ck / "step-6.tmp").exists() and not (ck / "step-6").exists()
    assert latest_checkpoint(out).name == "step-4"  # the half-written one is never picked

    # 3. Resumed again: from step 4, to the end.
    proc = start(recipe, "--resume")
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]
    assert f"continuing from {ck / 'step-4'} (step 4)" in log
    assert not list(ck.glob("*.tmp"))  # the stale half checkpoint was cleaned up
    resumed = metrics(out)

    # The same recipe uninterrupted, in this process.
    ref_raw = json.loads(json.dumps(raw))
    ref_raw["train"]["output_dir"] = str(assets.root / "uninterrupted")
    ref = train(recipe_from_dict(ref_raw), log=lambda *_: None)

    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(resumed[step] - ref.losses[step - 1]) <= 1e-5, (step, resumed[step], ref.losses[step - 1])
    assert adapter_diff(out / "adapter", ref.adapter_dir) <= 1e-6
    print("resume: losses 5-8", [round(resumed[s], 6) for s in range(5, 9)],
          "max diff", max(abs(resumed[s] - ref.losses[s - 1]) for s in range(5, 9)))


def test_two_process_ddp_matches_one_process(assets):
    """torchrun, 2 ranks × batch 2 vs one process × batch 4: the same global batches."""
    from data_tools.pipeline import prepare
    from finetune.config.recipe import recipe_from_dict
    from finetune.model.families import GEMMA4_UNIFIED
    from finetune.model.load import load_processor
    from finetune.training.batches import BatchPlan
    from finetune.training.loop import train

    steps = 3
    recipe, raw = write_recipe(assets, "ddp", max_steps=steps)
    out = Path(raw["train"]["output_dir"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "finetune.cli", "train", str(recipe)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "adapter identical on 2 ranks" in proc.stdout + proc.stderr
    digests = json.loads((out / "rank_digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]

    one_raw = json.loads(json.dumps(raw))
    one_raw["train"].update(output_dir=str(assets.root / "one-process"), batch_size=4)
    one = recipe_from_dict(one_raw)
    ref = train(one, log=lambda *_: None)
    ddp = metrics(out)
    for step in range(1, steps + 1):
        assert abs(ddp[step] - ref.losses[step - 1]) <= 1e-5, (step, ddp[step], ref.losses[step - 1])
    # (The adapters themselves are not compared with the one-process run: Adam turns the
    # 1e-8 differences of near-zero gradients, from another summation order, into updates of
    # up to ±lr. Steps 2 and 3's losses already depend on the updates.)

    # Some rank's micro-batch had no image (and some none audio): unused LoRA weights worked.
    data = prepare(one, load_processor(str(assets.base), 70), str(assets.base),
                   rejects_path=Path(one.train.output_dir) / "rejects.jsonl", chat=GEMMA4_UNIFIED.chat, log=None)
    cfg = SimpleNamespace(sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    ddp_t = recipe_from_dict(raw).train
    shares = [BatchPlan(data.train, ddp_t, 0, cfg, 2, rank, 256).micro_batch(i)
              for i in range(steps) for rank in (0, 1)]
    assert any("pixel_values" not in b for b in shares)
    assert any("input_features" not in b for b in shares)
    print("ddp: losses", [round(ddp[s], 6) for s in range(1, steps + 1)],
          "one process", [round(x, 6) for x in ref.losses], "torch threads", torch.get_num_threads())


def test_streaming_resume_is_exact(assets):
    """`data.streaming: true`: a resumed run restarts the stream at the saved position."""
    from finetune.config.recipe import recipe_from_dict
    from finetune.training.loop import train

    _, raw = write_recipe(assets, "stream", max_steps=4, save_every=2)
    raw["data"]["streaming"] = True
    recipe = recipe_from_dict(raw)
    full = train(recipe, log=lambda *_: None)
    ck = Path(raw["train"]["output_dir"]) / "checkpoints"
    assert latest_checkpoint(ck.parent).name == "step-4"  # the final state is a checkpoint too
    shutil.rmtree(ck / "step-4")  # as if the run had been killed after step 3
    again = train(recipe, resume=True, log=lambda *_: None)
    assert again.losses == pytest.approx(full.losses[2:], abs=1e-6)
    assert metrics(Path(raw["train"]["output_dir"])) == pytest.approx(dict(enumerate(full.losses, 1)), abs=1e-6)


def test_resume_refuses_shape_changes_and_warns_about_the_rest(assets, capsys):
    from finetune.cli.main import main

    path, raw = write_recipe(assets, "edited", max_steps=2)
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    raw["lora"]["r"] = 16
    raw["train"]["max_steps"] = 3
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lora.r: changed since the run in ") and "8 -> 16" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    raw["lora"]["r"] = 8
    raw["train"]["lr"] = 5e-4
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resume: warning: changed since the run began: train.lr: 0.001 -> 0.0005" in out
    assert "max_steps" not in out.split("resume: warning")[1].splitlines()[0]  # bookkeeping: silent


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_exactly(assets):
    from finetune.config.recipe import recipe_from_dict
    from finetune.training.loop import train

    path, raw = write_recipe(assets, "sigterm", max_steps=10)
    out = Path(raw["train"]["output_dir"])
    proc = start(path)
    t0 = time.time()
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() - t0 < 300, proc.stdout.read()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output[-2000:]
    ck = latest_checkpoint(out)
    assert f"stopped at step {ck.name[5:]}: checkpoint {ck}" in output
    assert f"resume with: finetune train {path} --resume" in output
    assert 3 <= int(ck.name[5:]) < 10
    straight = train(recipe_from_dict({**raw, "train": {**raw["train"], "output_dir": str(assets.root / "straight")}}))
    resumed = train(recipe_from_dict(raw), resume=True)
    assert resumed.losses == pytest.approx(straight.losses[int(ck.name[5:]):], abs=1e-6)
