"""The merge, combine and export verbs: argparse namespaces → library calls, logging to stdout.

Bad input raises UserError (the CLI prints it, exit 2). An artifact that fails its own
numeric check is a finetune bug: its message goes to stderr and the verb returns 1. Either way
the output folder, new or empty before the verb, is removed again: nothing half-written stays
where a server could pick it up. Before anything is written, the adapter's provenance is
compared with the base it is used on (`finetune.model.provenance`; `--force` goes on anyway).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from finetune.errors import UserError
from finetune.model.adapters import ParityError


def _run(fn, *args, out: str | None = None, **kwargs) -> int:
    fresh = out is not None and (not Path(out).exists() or (Path(out).is_dir() and not any(Path(out).iterdir())))
    try:
        fn(*args, **kwargs)
    except ParityError as e:
        _remove(out, fresh)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except UserError:
        _remove(out, fresh)
        raise
    return 0


def _remove(out: str | None, fresh: bool) -> None:
    """Remove a new output folder; a failed proof's report (the one file that explains the failure,
    and that no server reads) is kept beside it as OUT.failed_report.json."""
    if fresh and out and Path(out).exists():
        reports = sorted(Path(out).glob("*_report.json"))
        if reports:
            kept = Path(f"{Path(out)}.failed_report.json")
            shutil.move(str(reports[0]), kept)
            print(f"the failed proof's report: {kept}", file=sys.stderr)
        shutil.rmtree(out)
        print(f"removed the partial output {out}", file=sys.stderr)


def _check_provenance(args) -> None:
    """The adapter's base (from provenance.json) against the base it is about to be used on."""
    import json

    from finetune.model.adapters import CONFIG_FILE, base_of
    from finetune.model.provenance import check_base

    adapter = Path(args.adapter)
    try:
        config = json.loads((adapter / CONFIG_FILE).read_text(encoding="utf-8"))
        base = base_of(adapter, config, args.base)
    except (OSError, ValueError, UserError):
        return  # a missing or broken adapter or base: the verb itself names what is wrong
    check_base(adapter, base, force=getattr(args, "force", False), log=print)


def cmd_merge(args) -> int:
    from finetune.export.merge import merge_adapter
    from finetune.training.processes import refuse_several_processes

    refuse_several_processes("merge")
    _check_provenance(args)
    return _run(merge_adapter, args.adapter, args.out, out=args.out, base=args.base, dtype=args.dtype or "bf16",
                allow_pickle=args.allow_pickle, low_memory=getattr(args, "low_memory", None), log=print)


def cmd_combine(args) -> int:
    from finetune.export.combine import combine

    return _run(combine, args.spec, log=print)


def cmd_export(args) -> int:
    from finetune.export import FORMATS, export

    fmt = args.format
    if fmt not in FORMATS:
        raise UserError("--format", f"{fmt!r} is not an export format", f"Use one of {', '.join(FORMATS)}")
    if args.merge_projections and fmt not in ("vllm", "sglang"):
        raise UserError("--merge-projections", f"applies to --format vllm/sglang, not {fmt}",
                        "Drop it; merged folders carry every update already" if fmt == "merged" else "Drop it")
    if args.base_gguf and fmt not in ("gguf", "ollama"):
        raise UserError("--base-gguf", f"applies to --format gguf/ollama, not {fmt}", "Drop it")
    if getattr(args, "low_memory", None) and fmt != "merged":
        raise UserError("--low-memory", f"applies to --format merged, not {fmt}", "Drop it")
    link = getattr(args, "link", None)
    if link and fmt not in ("vllm", "sglang"):
        raise UserError("--link", f"applies to --format vllm/sglang, not {fmt}", "Drop it")
    if link and args.merge_projections:
        raise UserError("--link", "applies to the linked model folder, not to --merge-projections' full copy",
                        "Drop one of them")
    if fmt != "drafter":
        _check_provenance(args)
    opts = {"base": args.base, "allow_pickle": args.allow_pickle}
    if fmt in ("vllm", "sglang"):
        opts["merge_projections"] = args.merge_projections  # --outtype does not apply: PEFT folders stay as trained
        opts["link"] = link or "hard"
    elif fmt == "merged":
        opts["dtype"] = getattr(args, "dtype", None) or "bf16"
        opts["low_memory"] = getattr(args, "low_memory", None)
    elif fmt == "drafter":
        pass  # the drafter is exported as trained; --base names the target when its run doesn't
    else:
        opts["outtype"] = args.outtype or "f16"
        opts["base_gguf"] = args.base_gguf
    return _run(export, fmt, args.adapter, args.out, out=args.out, log=print, **opts)
