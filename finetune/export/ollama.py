"""Ollama: the GGUF LoRA plus a Modelfile (FROM, ADAPTER, the Gemma 4 TEMPLATE and stops).

Ollama's ADAPTER takes a GGUF LoRA; its safetensors-adapter import knows llama/gemma2-style
bases only and it can't import the gemma4_unified class from safetensors at all, so FROM must
be a GGUF of the base (llama.cpp's convert_hf_to_gguf.py makes one) and the adapter goes in
as the GGUF that `export_gguf` writes and proves.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from finetune.adapters import base_of, read_adapter, write_report
from finetune.errors import UserError
from finetune.export.gguf import GGUF_ARCH, export_gguf

PLACEHOLDER = "./REPLACE-WITH-BASE-MODEL.gguf"

# Go template rendering the same text as the Gemma 4 chat template: `<|turn>{role}\n…<turn|>\n`
# per turn, the assistant as `model`, and the generation prompt with the empty thinking
# scaffold the model was trained to answer after. BOS comes from the tokenizer, not here.
TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}<|turn>system
{{ .Content }}<turn|>
{{ else if eq .Role "user" }}<|turn>user
{{ .Content }}<turn|>
{{ if $last }}<|turn>model
<|channel>thought
<channel|>{{ end }}
{{- else if eq .Role "assistant" }}<|turn>model
{{ .Content }}{{ if not $last }}<turn|>
{{ end }}
{{- end }}
{{- end }}"""
# What TEMPLATE renders for one user message "Hi"; checked against the base's own template.
TEMPLATE_SAMPLE = "<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
STOPS = ("<turn|>", "<|turn>")


def _check_base_gguf(path: str, cfg) -> dict:
    """The FROM file must be a GGUF model of this base's shape, not safetensors or an adapter."""
    import gguf

    p = Path(path)
    if not p.exists():
        raise UserError(path, "base GGUF not found", "Pass the .gguf file of the base model with --base-gguf")
    if p.is_dir() or p.suffix in (".safetensors", ".bin"):
        raise UserError(path, "Ollama can't import a Gemma 4 (gemma4_unified) model from safetensors; FROM needs "
                        "the base as a GGUF file", "Convert the base with llama.cpp's convert_hf_to_gguf.py and "
                        "pass the .gguf with --base-gguf")
    try:
        fields = gguf.GGUFReader(p).fields
    except (ValueError, OSError) as e:
        raise UserError(path, f"not a readable GGUF file ({e})", "Pass the .gguf of the base model") from None
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    kind = fields["general.type"].contents() if "general.type" in fields else "model"
    text = cfg.text_config
    want = {"general.architecture": GGUF_ARCH[cfg.model_type], "general.type": "model",
            f"{arch}.block_count": text.num_hidden_layers, f"{arch}.embedding_length": text.hidden_size}
    got = {"general.architecture": arch, "general.type": kind,
           f"{arch}.block_count": fields[f"{arch}.block_count"].contents() if f"{arch}.block_count" in fields else None,
           f"{arch}.embedding_length": (fields[f"{arch}.embedding_length"].contents()
                                        if f"{arch}.embedding_length" in fields else None)}
    bad = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    if bad:
        raise UserError(path, "GGUF is not this adapter's base: " + ", ".join(
            f"{k} is {g!r}, expected {w!r}" for k, (g, w) in bad.items()), "Pass the GGUF converted from the base")
    return got


def _template_matches_base(base: str) -> bool:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    return text == (tok.bos_token or "") + TEMPLATE_SAMPLE


def export_ollama(adapter: str | Path, out: str | Path, *, base_gguf: str | None = None, outtype: str = "f32",
                  base: str | None = None, allow_pickle: bool = False,
                  log: Callable[[str], None] | None = None) -> dict:
    """OUT/adapter.gguf (see export_gguf), OUT/Modelfile and OUT/README.md."""
    from finetune.families import family_config

    log = log or (lambda _: None)
    adapter = Path(adapter)
    config, _ = read_adapter(adapter, allow_pickle=allow_pickle)
    _, cfg = family_config(base_of(adapter, config, base))
    base_meta = _check_base_gguf(base_gguf, cfg) if base_gguf else None
    report = export_gguf(adapter, out, outtype=outtype, base=base, allow_pickle=allow_pickle, log=log)
    out = Path(report["out"])
    source = str(Path(base_gguf).resolve()) if base_gguf else PLACEHOLDER
    stops = "".join(f'PARAMETER stop "{s}"\n' for s in STOPS)
    fill = "" if base_gguf else (f"# Replace {PLACEHOLDER} with the base model as GGUF (llama.cpp's "
                                 f"convert_hf_to_gguf.py on {report['base']}).\n")
    (out / "Modelfile").write_text(f"{fill}FROM {source}\nADAPTER ./adapter.gguf\n"
                                   f'TEMPLATE """{TEMPLATE}"""\n{stops}')
    name = re.sub(r"[^a-z0-9._-]+", "-", out.name.lower()).strip("-.") or "finetuned"
    (out / "README.md").write_text(
        f"# {name} for Ollama\n\n"
        + ("" if base_gguf else f"First edit `Modelfile`: point FROM at the base model as GGUF (not {PLACEHOLDER}).\n\n")
        + f"```\nollama create {name} -f Modelfile\nollama run {name}\n```\n\n"
        "- `adapter.gguf`: the LoRA of the text layers in llama.cpp's format, checked against the PEFT adapter "
        "(`export_report.json`).\n"
        "- Ollama's safetensors ADAPTER import supports llama/gemma2-style bases only, not Gemma 4, which is why "
        "this folder ships the GGUF LoRA.\n"
        "- Images and audio go through the base's mmproj file; LoRA on the vision/audio projections can't be "
        "applied there (merge it with `finetune merge` instead).\n")
    matches = _template_matches_base(report["base"])
    report.update({
        "format": "ollama", "gguf": {k: report[k] for k in ("file", "outtype", "max_rel_update_diff")},
        "modelfile": str(out / "Modelfile"), "from": source, "base_gguf": base_meta,
        "template_matches_base": matches, "ollama_create": f"ollama create {name} -f Modelfile",
    })
    report["checks"] = report["checks"] + [
        f"FROM: {'GGUF of the base (architecture, block count and width match)' if base_gguf else 'placeholder to fill'}",
        "ADAPTER: the GGUF LoRA in this folder (Ollama takes one GGUF adapter per model)",
        f"TEMPLATE renders one user turn as the base's chat template does: {matches}",
    ]
    write_report(out, "export_report.json", report)
    if not matches:
        log("warning: the base's chat template renders differently from the Gemma 4 TEMPLATE in the Modelfile")
    log(f"ollama: {out / 'Modelfile'}; then: cd {out} && ollama create {name} -f Modelfile")
    return report
