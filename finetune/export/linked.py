"""vLLM/SGLang: the base as a model folder made of the base's own weight files, the vision/audio
projection updates written into the files that hold those tensors.

Why not an index that maps the updated tensors to one small extra shard: vLLM and SGLang use
`model.safetensors.index.json` only to pick *files* (`filter_duplicate_safetensors_files`), then
load every tensor of every picked file; transformers 5 also loads the stale copy (checked: the
base's tensor wins). A tensor in two files is loaded twice and which copy wins depends on file
order (vLLM sorts by name, SGLang and vLLM's multi-threaded loader do not). So no tensor may
appear in two files, and the updated tensors must replace the old ones inside the file that
holds them. The folder therefore has, per weight file of the base:

- no updated tensor in it: a link to the base's file (`hard`: the folder stays valid when moved
  or when the base is deleted, but only on the base's file system; `symlink`: any file system,
  but the base must stay where it is);
- updated tensors in it: a copy-on-write clone of the file (FICLONE: btrfs, XFS, bcachefs, ZFS
  2.2+) with those tensors rewritten in place, same header and offsets, so it costs only the
  changed blocks; where the file system can't clone, a plain copy, patched the same way (the
  12B ships as one 24 GB file, so there it costs the file's size; the report says so).

Config, tokenizer, processor, chat template and generation_config.json are copied (small).
`check_linked` reads every written file back: linked files are the base's own inode or target,
patched files hold the base's tensors bit for bit except the updated ones, which hold
(base + update in fp32) rounded once to the file's dtype.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from finetune.errors import UserError
from finetune.export.merge_low_memory import keep_generation_config
from finetune.model.adapters import delta

LINKS = ("hard", "symlink")
FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int): clone a whole file, sharing its blocks
SMALL_SUFFIXES = (".json", ".jinja", ".model", ".txt")  # config, tokenizer, processor, template
INDEX = "model.safetensors.index.json"


def header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data section, the safetensors header) of a weight file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def _clone(src: Path, dst: Path) -> bool:
    """Clone `src` to `dst` copy-on-write; False (and no `dst`) where the file system can't."""
    with open(src, "rb") as s, open(dst, "wb") as d:
        try:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
            return True
        except OSError:
            pass
    dst.unlink()
    return False


def _link(src: Path, dst: Path, how: str, base: str) -> None:
    try:
        if how == "hard":
            os.link(src, dst)  # follows a symlink in the base (a hub cache snapshot) to the blob
        else:
            os.symlink(src.resolve(), dst)
    except OSError as e:
        why = ("hard links can't cross file systems and the output folder is on another one than the base"
               if e.errno == errno.EXDEV else f"{e.strerror.lower()} ({how} link)")
        raise UserError(str(dst.parent), f"can't link the base's {src.name}: {why}",
                        "Write the export on the base's file system, or pass --link symlink (the folder then "
                        f"needs {base} to stay where it is)" if how == "hard" else
                        "Write the export on a file system that allows symlinks") from None


def by_file(keys: dict[str, Path], want: dict[str, str]) -> dict[Path, dict[str, str]]:
    """{base weight file: {checkpoint key: LoRA module} of the updated tensors it holds} for every file."""
    files: dict[Path, dict[str, str]] = {}
    for key, f in keys.items():
        files.setdefault(f, {})
        if key in want:
            files[f][key] = want[key]
    return files


def check_linkable(out: Path, keys: dict[str, Path], want: dict[str, str], link: str, base: str) -> None:
    """Refuse before anything is written when hard links can't be made: a base file to link lies on
    another file system than `out`."""
    if link not in LINKS:
        raise UserError("--link", f"{link!r} is not a link kind", f"Use one of {', '.join(LINKS)}")
    if link != "hard":
        return
    parent = Path(out).absolute()
    while not parent.exists():
        parent = parent.parent
    for src, changed in by_file(keys, want).items():
        if not changed and os.stat(src).st_dev != os.stat(parent).st_dev:
            raise UserError(str(out), f"can't hard-link the base's {src.name} into it: hard links can't cross file "
                            f"systems, and {parent} is on another one than {src.parent}", "Write the export on the "
                            f"base's file system, or pass --link symlink (the folder then needs {base} to stay where "
                            "it is)")


def _updated(base_t: torch.Tensor, config: dict, module: str, pair) -> torch.Tensor:
    """(base + update in fp32) rounded once to the base tensor's dtype."""
    return (base_t.float() + delta(config, module, *pair)).to(base_t.dtype).contiguous()


def _patch(path: Path, src: Path, changed: dict[str, str], config: dict, pairs: dict) -> int:
    """Rewrite the `changed` tensors (key -> LoRA module) of `path` in place, from `src`'s values;
    the number of bytes written."""
    from safetensors import safe_open

    start, head = header(path)
    written = 0
    with safe_open(src, "pt") as st, open(path, "r+b") as f:
        for key, module in changed.items():
            new = _updated(st.get_tensor(key), config, module, pairs[module])
            begin, end = head[key]["data_offsets"]
            data = new.reshape(-1).view(torch.uint8).numpy().tobytes()  # the file's own little-endian bytes
            if len(data) != end - begin:  # a bug, not bad input: the header is the base's own
                raise RuntimeError(f"{path}: {key} is {end - begin} bytes in the file, the update {len(data)}")
            f.seek(start + begin)
            f.write(data)
            written += len(data)
    return written


def write_linked(out: Path, base: str, keys: dict[str, Path], want: dict[str, str], config: dict, pairs: dict,
                 *, link: str = "hard", log: Callable[[str], None] | None = None) -> dict:
    """Write the model folder `out` (see the module docstring) for the base's `keys` ({checkpoint
    key: file}) with `want` ({checkpoint key: LoRA module}) updated; returns the byte account."""
    log = log or (lambda _: None)
    check_linkable(out, keys, want, link, base)
    root = Path(base)
    out.mkdir(parents=True, exist_ok=True)
    small = 0
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix in SMALL_SUFFIXES and f.name != "generation_config.json":
            shutil.copy2(f, out / f.name)
            small += f.stat().st_size
    keep_generation_config(base, out)
    files = []
    for src, changed in by_file(keys, want).items():
        rel = src.relative_to(root) if src.is_relative_to(root) else Path(src.name)
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        size = src.stat().st_size
        if not changed:
            _link(src, dst, link, base)
            files.append({"file": str(rel), "how": f"{link} link", "bytes": size, "written": 0})
            continue
        cloned = _clone(src, dst)
        if not cloned:
            shutil.copyfile(src, dst)
        patched = _patch(dst, src, changed, config, pairs)
        files.append({"file": str(rel), "how": "clone, patched" if cloned else "copy, patched", "bytes": size,
                      "written": patched if cloned else size, "updated_tensors": sorted(changed),
                      "updated_bytes": patched})
        if not cloned:
            log(f"linked model: {rel} holds the projections next to other weights and this file system can't "
                f"clone it copy-on-write, so it is copied ({size / 2**20:.1f} MiB) with {len(changed)} tensors "
                "rewritten in place (on btrfs/XFS only the changed blocks would be new)")
    base_bytes = sum(f["bytes"] for f in files)
    written = sum(f["written"] for f in files) + small
    return {"link": link, "files": files, "base_bytes": base_bytes, "small_file_bytes": small,
            "updated_tensor_bytes": sum(f.get("updated_bytes", 0) for f in files),
            "bytes_written": written, "added_share_of_base": written / base_bytes}


def check_linked(out: Path, base: str, keys: dict[str, Path], want: dict[str, str], config: dict,
                 pairs: dict) -> dict:
    """Read the folder back: linked files are the base's; in patched files every tensor equals the
    base's bit for bit except the updated ones, which equal (base + update) rounded once; no
    tensor lives in two files. One tensor in memory at a time."""
    from safetensors import safe_open

    root = Path(base)
    mismatched, seen, worst_lost = [], {}, 0.0
    for src in dict.fromkeys(keys.values()):
        dst = out / (src.relative_to(root) if src.is_relative_to(root) else Path(src.name))
        if not dst.is_file():
            mismatched.append(str(dst))
            continue
        _, head = header(dst)
        for key in head:
            if key != "__metadata__":
                seen[key] = seen.get(key, 0) + 1
        if os.path.samefile(dst, src):
            continue
        with safe_open(src, "pt") as a, safe_open(dst, "pt") as b:
            if set(a.keys()) != set(b.keys()):
                mismatched.append(str(dst))
                continue
            for key in a.keys():
                base_t, got = a.get_tensor(key), b.get_tensor(key)
                if key in want:
                    pair = pairs[want[key]]
                    expected = _updated(base_t, config, want[key], pair)
                    upd = delta(config, want[key], *pair)
                    lost = float(torch.linalg.vector_norm(got.float() - base_t.float() - upd))
                    worst_lost = max(worst_lost, lost / max(float(torch.linalg.vector_norm(upd)), 1e-30))
                else:
                    expected = base_t
                if got.dtype != expected.dtype or not torch.equal(got, expected):
                    mismatched.append(key)
    twice = sorted(k for k, n in seen.items() if n > 1)
    index_ok = True
    if (root / INDEX).is_file():
        index_ok = (out / INDEX).read_bytes() == (root / INDEX).read_bytes()
    return {"tensors": len(seen), "mismatched_tensors": mismatched[:5], "tensors_in_two_files": twice[:5],
            "index_is_the_base_s": index_ok, "update_rounding_rel_error": worst_lost,
            "ok": not mismatched and not twice and index_ok and set(seen) == set(keys)}


def prove_linked(adapter: Path, out: Path, base: str, family, keys: dict[str, Path], want: dict[str, str],
                 config: dict, pairs: dict, attach: Path | None) -> dict:
    """The probe through `out` loaded by transformers (+ the exported text adapter `attach`) vs base +
    source adapter. Three numbers, as in the merge: merge_diff (projections merged exactly in
    fp32 vs PEFT), rounding_diff (merged and rounded to the files' dtype, as written), reload_diff
    (the folder as loaded vs what its files should hold: ~0)."""
    from safetensors import safe_open

    from finetune.export.proof import logits_with, max_diff, reference

    ref = reference(base, family, adapter)
    expected, rounds = {}, False
    for key, module in want.items():
        with safe_open(keys[key], "pt") as st:
            base_t = st.get_tensor(key)
        expected[f"{module}.weight"] = _updated(base_t, config, module, pairs[module]).float()
        rounds = rounds or base_t.dtype != torch.float32
    served = logits_with(base, family, ref.batch, folder=out, attach=attach)
    as_written = logits_with(base, family, ref.batch, replace=expected, attach=attach)
    exact = (logits_with(base, family, ref.batch, add={m: delta(config, m, *pairs[m]) for m in want.values()},
                         attach=attach) if rounds else as_written)
    report = {**ref.report(), "merge_diff": max_diff(exact, ref.logits), "rounding_diff": max_diff(as_written, ref.logits),
              "reload_diff": max_diff(served, as_written), "max_abs_diff": max_diff(served, ref.logits)}
    report["ok"] = report["merge_diff"] <= ref.merge_tol and report["reload_diff"] <= ref.tol
    if not report["ok"]:  # which of the folder's tensors, as loaded, is not the base's + its update
        from finetune.export.proof import furthest, load_base

        loaded = dict(load_base(str(out), family).named_parameters())
        wanted = dict(load_base(base, family).named_parameters()) | expected
        report["furthest"] = furthest({k: loaded[k].detach() for k in wanted if k in loaded},
                                      {k: v.detach() for k, v in wanted.items()})
    return report
