"""What an adapter was trained from, kept beside it and checked before it is used again.

`provenance.json` (in the run folder from the first step, copied into the adapter folder when it
is saved) names the base and holds a hash of its config.json, and a hash of the datasets' records
(`data_tools.cache.data_fingerprint`). `check_base` runs before `eval`, `merge` and `export`
use an adapter on a base; `check_resume_data` before `train --resume` continues a run. A
mismatch is a UserError naming both sides (exit 2) unless `--force`, which logs it instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from finetune.errors import UserError

FILE = "provenance.json"
# Keys of config.json that say where or by what it was written, not what the model is.
_NOT_SHAPE = ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype")


def base_fingerprint(base: str) -> str | None:
    """A hash of the base's config.json (without where/by-what keys), or None when it can't be
    read here (a hub id not in the local cache)."""
    path = Path(base) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(base, "config.json")
        except Exception:  # not a repo id either: nothing to compare
            return None
        if not isinstance(found, str):
            return None
        path = Path(found)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    shape = {k: v for k, v in config.items() if k not in _NOT_SHAPE} if isinstance(config, dict) else config
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def of_recipe(recipe) -> dict:
    """The provenance of a run of `recipe`: its base and its training data."""
    from data_tools.cache import data_fingerprint

    return {"base": recipe.model.base, "base_config": base_fingerprint(recipe.model.base),
            "datasets": [spec.path for spec in recipe.datasets],
            "data": data_fingerprint(recipe.datasets)}


def write(folder: str | Path, provenance: dict) -> None:
    (Path(folder) / FILE).write_text(json.dumps(provenance, indent=1) + "\n")


def read(folder: str | Path) -> dict | None:
    path = Path(folder) / FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        raise UserError(str(path), "is not valid JSON", "Restore it, or delete it to skip the check") from None


def _refuse(where: str, what: str, fix: str, force: bool, log: Callable[[str], None] | None) -> None:
    if not force:
        raise UserError(where, what, f"{fix}, or pass --force to go on anyway")
    if log:
        log(f"warning: {where}: {what} (--force: going on)")


def check_base(adapter: str | Path, base: str, *, force: bool = False,
               log: Callable[[str], None] | None = None) -> None:
    """The adapter at `adapter` was trained on a base with `base`'s config (when both are known)."""
    prov = read(adapter)
    if not prov or not prov.get("base_config"):
        return
    now = base_fingerprint(base)
    if now and now != prov["base_config"]:
        _refuse(str(adapter), f"was trained on {prov['base']} (config {prov['base_config']}), not on {base} "
                f"(config {now})", f"Use it with {prov['base']}", force, log)


def check_resume(recipe, out: str | Path, *, force: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
    """A resumed run trains on the base and the records it began with."""
    before = read(out)
    if not before:
        return
    now = of_recipe(recipe)
    if before.get("base_config") and now["base_config"] and before["base_config"] != now["base_config"]:
        _refuse(str(out), f"began on {before['base']} (config {before['base_config']}); {now['base']} now has "
                f"config {now['base_config']}", "Resume with the base it began on", force, log)
    if before.get("data") and before["data"] != now["data"]:
        _refuse(str(out), f"began on datasets {before['datasets']} (data {before['data']}); they now hold "
                f"data {now['data']} ({now['datasets']})", "Put the files back as they were, or train into a "
                "new train.output_dir", force, log)
