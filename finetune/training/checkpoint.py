"""Checkpoints that load without running code, for exact resume.

`<output_dir>/checkpoints/step-N/` holds:
- `adapter/`: the PEFT adapter (safetensors), loadable on its own like the final one (absent when
  only the objective trains: `Objective.trains_model`);
- `trainer_state.safetensors`: every tensor of the optimizer state and the torch/CUDA RNG states;
- `trainer_state.json`: step, data position, scheduler state, the optimizer's other values and
  the Python/NumPy RNG states, as plain JSON (tensors referenced by name);
- `objective.safetensors`: weights the objective owns, if any;
- `COMPLETE`: written last. A checkpoint is written to `step-N.tmp` and renamed, so a kill never
  leaves a half checkpoint as the newest.

Nothing here unpickles: JSON and safetensors can't carry code. A checkpoint in the old pickle
format (`state.pt`) is refused, never loaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from finetune.errors import UserError
from finetune.model.load import unwrap
from finetune.training.sharding import SHARDED_OPTIMIZER, is_sharded, load_adapter_state, load_optimizer_state
from finetune.training.wrappers import LossForward

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
OBJECTIVE_TENSORS = "objective.safetensors"
PICKLED_STATE = "state.pt"  # the old format: refused


# ---------------------------------------------------------------- JSON + tensors


def flatten(obj, key: str, tensors: dict[str, torch.Tensor]):
    """`obj` as JSON-able data; tensors go to `tensors` under a path-like key. Dict keys keep
    their type (the optimizer's state is keyed by int), tuples stay tuples."""
    if torch.is_tensor(obj):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.dtype.str, "data": obj.tolist()}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"{key}: cannot store a {type(obj).__name__} in a checkpoint")


def unflatten(data, tensors: dict[str, torch.Tensor]):
    if isinstance(data, list):
        return [unflatten(v, tensors) for v in data]
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__ndarray__" in data:
            return np.asarray(data["data"], dtype=np.dtype(data["__ndarray__"]))
        if "__dict__" in data:
            return {k: unflatten(v, tensors) for k, v in data["__dict__"]}
        if "__tuple__" in data:
            return tuple(unflatten(v, tensors) for v in data["__tuple__"])
    return data


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------- save / find / load


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, position: int, keep: int,
                    full: dict | None = None) -> Path:
    """Write checkpoint `step` (see the module docstring); keep the newest `keep`. A sharded (FSDP)
    run passes its state gathered whole (`finetune.training.sharding.gather_for_save`): the adapter
    is written in the single-process layout, the optimizer state keyed by parameter name."""
    from safetensors.torch import save_file

    ckdir = Path(out) / "checkpoints"
    final = ckdir / f"step-{step}"
    tmp = ckdir / f"step-{step}.tmp"
    for stale in ckdir.glob("step-*.tmp"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    if _trains_model(model):
        unwrap(model, peft=True).save_pretrained(tmp / "adapter", **({"state_dict": full["adapter"]} if full else {}))
    _test_pause_in_save(step)
    tensors: dict[str, torch.Tensor] = {}
    state = {"step": step, "position": position, "optimizer_format": SHARDED_OPTIMIZER if full else "index",
             "optimizer": flatten(full["optimizer"] if full else optimizer.state_dict(), "optimizer", tensors),
             "scheduler": flatten(scheduler.state_dict(), "scheduler", tensors),
             "rng": flatten(rng_state(), "rng", tensors)}
    # safetensors refuses tensors that share memory; the state holds small, separate ones
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps(state))
    own = full["objective"] if full else _objective_state(model)
    if own:
        save_file(own, str(tmp / OBJECTIVE_TENSORS))
    (tmp / "COMPLETE").write_text(str(step))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(complete_checkpoints(out), key=lambda p: int(p.name[5:]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _trains_model(model) -> bool:
    inner = model.module if hasattr(model, "module") else model
    return not isinstance(inner, LossForward) or inner.objective.trains_model


def _objective_state(model) -> dict[str, torch.Tensor]:
    inner = model.module if hasattr(model, "module") else model
    if not isinstance(inner, LossForward):
        return {}
    return {k: v.detach().cpu().contiguous() for k, v in inner.objective.state_dict().items()}


def _test_pause_in_save(step: int) -> None:
    """Test hook, inert unless FINETUNE_TEST_SLOW_SAVE="STEP:SECONDS" is set: sleep halfway
    through writing checkpoint STEP (adapter written, trainer state not yet), so a test can
    SIGKILL a real run in the middle of a save (tests/training/test_resume_ddp.py)."""
    spec = os.environ.get("FINETUNE_TEST_SLOW_SAVE")
    if spec:
        at, _, seconds = spec.partition(":")
        if int(at) == step:
            time.sleep(float(seconds))


def complete_checkpoints(out: Path) -> list[Path]:
    ckdir = Path(out) / "checkpoints"
    if not ckdir.exists():
        return []
    return [p for p in ckdir.glob("step-*") if not p.name.endswith(".tmp")
            and (p / "COMPLETE").exists() and p.name[5:].isdigit()]


def latest_checkpoint(out: Path) -> Path | None:
    cks = complete_checkpoints(out)
    return max(cks, key=lambda p: int(p.name[5:])) if cks else None


def load_checkpoint(ck: Path, model, optimizer, scheduler) -> tuple[int, int]:
    """Restore adapter, optimizer, scheduler and RNG from `ck`; (step, data position)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (ck / STATE_JSON).is_file():
        if (ck / PICKLED_STATE).exists():
            raise UserError(str(ck / PICKLED_STATE), "checkpoint state stored as a pickle; loading it "
                            "could run code hidden in the file, so finetune never does",
                            "Resume from a checkpoint written by this version of finetune, or "
                            "start a fresh run")
        raise UserError(str(ck), f"no {STATE_JSON} in this checkpoint",
                        "Resume from a complete checkpoint, or start a fresh run")
    try:
        state = json.loads((ck / STATE_JSON).read_text())
        tensors = load_file(str(ck / STATE_TENSORS))
    except (ValueError, OSError) as e:
        raise UserError(str(ck), f"damaged checkpoint ({e})",
                        "Delete this checkpoint folder to resume from the one before") from None
    sharded = is_sharded(model)
    written = state.get("optimizer_format", "index")
    if written != (SHARDED_OPTIMIZER if sharded else "index"):
        how = ("launched with FSDP", "launched without FSDP")
        raise UserError(str(ck), f"written by a run {how[written != SHARDED_OPTIMIZER]}, resumed "
                        f"{how[not sharded]}: its optimizer state is laid out for that", "Resume it the way it "
                        "was launched (the adapter in it loads anywhere)")
    if _trains_model(model):
        weights = load_file(str(ck / "adapter" / "adapter_model.safetensors"))
        if sharded:
            load_adapter_state(model, weights, unwrap(model, peft=True).active_adapter)
        else:
            set_peft_model_state_dict(unwrap(model, peft=True), weights)
    if (ck / OBJECTIVE_TENSORS).is_file():
        inner = model.module if hasattr(model, "module") else model
        inner.objective.load_state_dict(load_file(str(ck / OBJECTIVE_TENSORS)))
    if sharded:
        load_optimizer_state(model, optimizer, unflatten(state["optimizer"], tensors))
    else:
        optimizer.load_state_dict(unflatten(state["optimizer"], tensors))
    scheduler.load_state_dict(unflatten(state["scheduler"], tensors))
    set_rng_state(unflatten(state["rng"], tensors))
    return state["step"], state["position"]
