"""`finetune export --format F ADAPTER OUT`: one writer per server, each proving what it wrote.

Every format writes OUT/export_report.json listing what was checked and the numbers, and
returns that report; its summary lines go to the `log` callback it is given (None: silent).
Every report has `serve`: `model` (the path or hub id to load), `adapter` (the LoRA folder or
GGUF; None when the updates are merged), `mmproj` (llama.cpp's projector file, where there is
one) and `command` (the line that serves it), and every format carries everything the adapter
learned, the vision/audio projections included:

- vllm / sglang (`vllm.py`): the PEFT text adapter, plus OUT/base when the projections changed
  (`linked.py`: the base's weight files linked, the projection tensors rewritten in the file
  that holds them; `--merge-projections`: a full merged copy instead);
- gguf (`gguf.py`): adapter.gguf (text LoRA) + mmproj.gguf (`mmproj.py`, projections merged);
- ollama (`ollama.py`): the gguf pair + a Modelfile;
- merged: one merged HF folder (`finetune.export.merge`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from finetune.registry import Registry

# Formats of feature packages, imported when asked for (finetune.registry).
FEATURES = {"drafter": "finetune.drafter.export"}
_WRITERS = Registry("export format", FEATURES)
register = _WRITERS.register


@register("merged")
def export_merged(adapter: str | Path, out: str | Path, *, dtype: str = "bf16", base: str | None = None,
                  allow_pickle: bool = False, low_memory: bool | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """The merged HF folder of `finetune merge`, with its report also as export_report.json."""
    from finetune.export.merge import merge_adapter
    from finetune.model.adapters import write_report

    report = {"format": "merged", **merge_adapter(adapter, out, base=base, dtype=dtype, allow_pickle=allow_pickle,
                                                  low_memory=low_memory, log=log)}
    report["checks"] = [
        "merged on full-precision weights (never 4-bit), saved with the checkpoint's key names",
        *(["every written tensor == (base + update in fp32) rounded once to the dtype; others == base"]
          if report.get("mode") == "low_memory" else [
            "reloaded folder == in-memory merge rounded to the dtype (reload_diff)",
            "merge == base+adapter on a text/image/audio probe (merge_diff); max_abs_diff includes dtype rounding"]),
    ]
    report["serve"] = {"model": str(out), "adapter": None, "command": f"vllm serve {out}"}
    write_report(Path(out), "export_report.json", report)
    if log:
        log(f"serve with: {report['serve']['command']}")
    return report


@register("vllm")
def _export_vllm(adapter, out, **kw) -> dict:
    from finetune.export.vllm import export_vllm

    return export_vllm(adapter, out, server="vllm", **kw)


@register("sglang")
def _export_sglang(adapter, out, **kw) -> dict:
    from finetune.export.vllm import export_vllm

    return export_vllm(adapter, out, server="sglang", **kw)


@register("gguf")
def _export_gguf(adapter, out, **kw) -> dict:
    from finetune.export.gguf import export_gguf

    return export_gguf(adapter, out, **kw)


@register("ollama")
def _export_ollama(adapter, out, **kw) -> dict:
    from finetune.export.ollama import export_ollama

    return export_ollama(adapter, out, **kw)


FORMATS = tuple(_WRITERS.names())
"""Every export format, the one list the CLI's `--format` choices and the docs read."""


def export(fmt: str, adapter: str | Path, out: str | Path, *, log: Callable[[str], None] | None = None,
           **opts) -> dict:
    """Dispatch to the writer of `fmt`; `opts` are that writer's keyword arguments."""
    from finetune.errors import UserError

    writer = _WRITERS.get(fmt)
    if writer is None:
        raise UserError("--format", f"{fmt!r} is not an export format", f"Use one of {', '.join(FORMATS)}")
    return writer(adapter, out, log=log, **opts)
