"""`finetune export --format drafter DRAFTER OUT`: the aligned MTP drafter, ready for the servers.

OUT is a clean HF folder (config.json, model.safetensors, generation_config.json drafting k tokens
per round, the target's tokenizer files) written with `save_pretrained` and read back tensor for
tensor against the source. DRAFTER is what `finetune align-drafter` wrote (its recipe.lock.yaml
names the base and the adapter the drafter was aligned to; `--base` overrides the base).

The serve lines put it next to the adapted target:
- vLLM: `--speculative-config '{"method": "mtp", "model": OUT, "num_speculative_tokens": k}'`,
  on the base with the adapter as a LoRA module (or on the merged model);
- SGLang: `--speculative-algorithm NEXTN --speculative-draft-model-path OUT` with k steps, top-1;
- llama.cpp: llama.cpp's own `convert_hf_to_gguf.py OUT` gives a `gemma4-assistant` GGUF, served
  with `-md drafter.gguf --spec-type draft-mtp --spec-draft-n-max k` next to the target's GGUF
  (base + `--lora`, or merged) and its `--mmproj`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from finetune.errors import UserError
from finetune.export import register


def _run_settings(drafter: Path) -> dict:
    """The align-drafter run's recipe.lock.yaml (base, adapter, k), if the folder has one."""
    import yaml

    lock = drafter / "recipe.lock.yaml"
    return (yaml.safe_load(lock.read_text()) or {}) if lock.is_file() else {}


def serve_lines(out: Path, base: str, adapter: str | None, k: int) -> dict[str, str]:
    """The commands that serve base (+ adapter) with the drafter at `out` drafting `k` tokens."""
    spec = json.dumps({"method": "mtp", "model": str(out), "num_speculative_tokens": k})
    lora_vllm = lora_sglang = ""
    if adapter:
        from finetune.export.vllm import max_lora_rank
        from finetune.model.adapters import read_adapter

        rank = max_lora_rank(int(read_adapter(adapter)[0].get("r", 16))) or 512
        lora_vllm = f" --enable-lora --lora-modules adapter={adapter} --max-lora-rank {rank}"
        lora_sglang = f" --enable-lora --lora-paths adapter={adapter} --max-lora-rank {rank}"
    target_gguf = "merged.gguf" if adapter else "base.gguf"
    return {
        "vllm": f"vllm serve {base}{lora_vllm} --speculative-config '{spec}'",
        "sglang": (f"python -m sglang.launch_server --model-path {base}{lora_sglang} --speculative-algorithm NEXTN "
                   f"--speculative-draft-model-path {out} --speculative-num-steps {k} "
                   f"--speculative-num-draft-tokens {k + 1} --speculative-eagle-topk 1"),
        "llama.cpp": (f"python convert_hf_to_gguf.py {out} --outfile drafter.gguf && "
                      f"llama-server -m {target_gguf} --mmproj mmproj.gguf -md drafter.gguf --spec-type draft-mtp "
                      f"--spec-draft-n-max {k}"),
        "transformers": (f"target.generate(**inputs, assistant_model=Gemma4UnifiedAssistantForCausalLM"
                         f".from_pretrained({str(out)!r}))"),
    }


@register("drafter")  # ADAPTER is the aligned drafter's folder here
def export_drafter(drafter: str | Path, out: str | Path, *, base: str | None = None, allow_pickle: bool = False,
                   log: Callable[[str], None] | None = None) -> dict:
    """Write OUT (see the module docstring), prove it and return the report."""
    from safetensors.torch import load_file

    from finetune.drafter.model import load_drafter, read_config, save_drafter, saved_dtype
    from finetune.model.adapters import prepare_out, write_report
    from finetune.model.families import family_config

    log = log or (lambda _: None)
    drafter = Path(drafter)
    settings = _run_settings(drafter)
    base = base or settings.get("model", {}).get("base")
    if not base:
        raise UserError(str(drafter), "no recipe.lock.yaml naming the base this drafter serves",
                        "Pass --base with the target's base model")
    adapter = settings.get("drafter", {}).get("adapter")
    k = int(settings.get("drafter", {}).get("num_tokens") or 4)
    cfg = read_config(str(drafter), where=str(drafter))
    _, target_cfg = family_config(base, where="--base")
    model = load_drafter(str(drafter), target_cfg, where=str(drafter), dtype=saved_dtype(cfg))
    out = prepare_out(out, drafter, base)
    save_drafter(model, out, num_tokens=k, tokenizer_from=base)

    # Read back what a server reads: every tensor equal to the source's.
    source = {}
    for f in sorted(drafter.glob("*.safetensors")):
        source.update(load_file(f))
    written = {}
    for f in sorted(out.glob("*.safetensors")):
        written.update(load_file(f))
    missing = sorted(set(source) - set(written))
    worst = max((float((written[n].float() - t.float()).abs().max()) for n, t in source.items() if n in written),
                default=0.0)
    reread = read_config(str(out), where=str(out))
    generation = json.loads((out / "generation_config.json").read_text())
    lines = serve_lines(out, base, adapter, k)
    serve = {"model": base, "adapter": adapter, "drafter": str(out), "command": lines["vllm"], "commands": lines}
    report = {
        "format": "drafter", "drafter": str(drafter), "out": str(out), "base": base, "adapter": adapter,
        "num_assistant_tokens": generation.get("num_assistant_tokens"), "tensors": len(written),
        "max_abs_diff": worst, "dtype": str(saved_dtype(reread)).removeprefix("torch."), "serve": serve,
        "checks": [
            f"config: model_type {reread.model_type}, backbone_hidden_size {reread.backbone_hidden_size} = the "
            "base's hidden size, kv heads and head sizes of the layers it reads match the base",
            f"weights: {len(written)} tensors read back, max |written - source| = {worst:.3g}"
            + (f"; missing {missing[:3]}" if missing else ""),
            f"generation_config: num_assistant_tokens = {generation.get('num_assistant_tokens')} (k)",
        ],
    }
    write_report(out, "export_report.json", report)
    if missing or worst > 0 or reread.model_type != cfg.model_type:
        from finetune.model.adapters import ParityError

        raise ParityError(f"{out}: the written drafter differs from {drafter} (max {worst:.3g}, missing {missing[:3]})")
    log(f"drafter: {len(written)} tensors, k = {k} -> {out}")
    for name, line in lines.items():
        log(f"serve ({name}): {line}")
    return report
