"""Ollama: the llama.cpp export (LoRA GGUF + projector GGUF) plus a Modelfile (FROM the base,
FROM the projector, ADAPTER, the Gemma 4 TEMPLATE and stops).

Ollama's ADAPTER takes a GGUF LoRA; its safetensors-adapter import knows llama/gemma2-style
bases only and it can't import the gemma4_unified class from safetensors at all, so FROM must
be a GGUF of the base (llama.cpp's convert_hf_to_gguf.py makes one), the adapter goes in as the
GGUF that `export_gguf` writes and proves, and the vision/audio updates ride in its mmproj.gguf,
given to Ollama as a second FROM (how Ollama takes a llama.cpp projector file).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from finetune.export.gguf import export_gguf
from finetune.export.ollama_template import TEMPLATE
from finetune.model.adapters import write_report

PLACEHOLDER = "./REPLACE-WITH-BASE-MODEL.gguf"

# What TEMPLATE renders for one user message "Hi"; checked against the base's own template.
TEMPLATE_SAMPLE = "<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
# The end of a turn, and the end of a call turn (the model writes <|tool_response> after its calls).
STOPS = ("<turn|>", "<|turn>", "<|tool_response>")


def _template_matches_base(base: str) -> bool:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    return text == (tok.bos_token or "") + TEMPLATE_SAMPLE


def modelfile(source: str, *, projector: bool, adapter: bool) -> str:
    """The Modelfile: FROM the base (and the projector), ADAPTER, TEMPLATE, one stop per line."""
    stops = "".join(f'PARAMETER stop "{s}"\n' for s in STOPS)
    return (f"FROM {source}\n" + ("FROM ./mmproj.gguf\n" if projector else "")
            + ("ADAPTER ./adapter.gguf\n" if adapter else "") + f'TEMPLATE """{TEMPLATE}"""\n{stops}')


def export_ollama(adapter: str | Path, out: str | Path, *, base_gguf: str | None = None, outtype: str = "f32",
                  base: str | None = None, allow_pickle: bool = False,
                  log: Callable[[str], None] | None = None) -> dict:
    """OUT/adapter.gguf and OUT/mmproj.gguf (see export_gguf), OUT/Modelfile and OUT/README.md."""
    log = log or (lambda _: None)
    report = export_gguf(adapter, out, outtype=outtype, base=base, base_gguf=base_gguf, allow_pickle=allow_pickle,
                         log=lambda line: None if line.startswith("serve with") else log(line))
    out = Path(report["out"])
    source = str(Path(base_gguf).resolve()) if base_gguf else PLACEHOLDER
    fill = "" if base_gguf else (f"# Replace {PLACEHOLDER} with the base model as GGUF (llama.cpp's "
                                 f"convert_hf_to_gguf.py on {report['base']}).\n")
    projector = "mmproj.gguf" in report["serve"].get("mmproj", "")
    adapter_file = bool(report["serve"]["adapter"])
    (out / "Modelfile").write_text(fill + modelfile(source, projector=projector, adapter=adapter_file))
    name = re.sub(r"[^a-z0-9._-]+", "-", out.name.lower()).strip("-.") or "finetuned"
    (out / "README.md").write_text(
        f"# {name} for Ollama\n\n"
        + ("" if base_gguf else f"First edit `Modelfile`: point FROM at the base model as GGUF (not {PLACEHOLDER}).\n\n")
        + f"```\nollama create {name} -f Modelfile\nollama run {name}\n```\n\n"
        "- `adapter.gguf`: the LoRA of the text layers in llama.cpp's format, checked against the PEFT adapter "
        "(`export_report.json`).\n"
        "- `mmproj.gguf`: the image/audio projector with the adapter's vision/audio updates merged in, as "
        "llama.cpp's converter lays it out; the second FROM.\n"
        "- Ollama's safetensors ADAPTER import supports llama/gemma2-style bases only, not Gemma 4, which is why "
        "this folder ships GGUF files.\n")
    matches = _template_matches_base(report["base"])
    command = f"ollama create {name} -f {out / 'Modelfile'} && ollama run {name}"
    report.update({
        "format": "ollama", "gguf": {k: report[k] for k in ("file", "outtype", "max_rel_update_diff") if k in report},
        "modelfile": str(out / "Modelfile"), "from": source, "template_matches_base": matches,
        "ollama_create": f"ollama create {name} -f Modelfile",
        "serve": {**report["serve"], "model": source, "command": command},
    })
    report["checks"] = report["checks"] + [
        f"FROM: {'GGUF of the base (architecture, block count and width match)' if base_gguf else 'placeholder to fill'}",
        "FROM ./mmproj.gguf: the projector (vision/audio updates merged)" if projector else "no projector file",
        "ADAPTER: the GGUF LoRA in this folder (Ollama takes one GGUF adapter per model)",
        f"TEMPLATE renders one user turn as the base's chat template does: {matches}",
        "TEMPLATE renders system, tools, calls and tool responses as Google's Gemma 4 template does, thinking "
        "off and on (checked by Go's text/template in the ollama_template test tier)",
    ]
    write_report(out, "export_report.json", report)
    if not matches:
        log("warning: the base's chat template renders differently from the Gemma 4 TEMPLATE in the Modelfile")
    log(f"ollama: {out / 'Modelfile'}")
    log(f"serve with: {command}")
    return report
