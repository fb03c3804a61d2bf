"""`finetune eval | generate | chat`: the adapter judged item by item, and talked to.

`eval` runs the recipe's held-out items through the base and then through base + adapter (the
base is loaded once, in the recipe's quantization, and the adapter attached on top), scores
every answer with its dataset's metric, and writes `eval.json` and a self-contained
`report.html` (media inlined as data: URLs, so the file can be mailed or archived).
Generation is greedy and batched with left padding; items are batched only with items carrying
the same number of images and audio clips, because the processor wants one layout per batch.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from data_tools.conversation import BadRecord, Conversation, Message, Part
from finetune.errors import UserError
from finetune.evaluate import EvalItem, eval_items, generate_items

# ---------------------------------------------------------------- scoring


def _winner(metric: str, base: float, adapter: float) -> str:
    from finetune.evaluate import LOWER_IS_BETTER

    if abs(base - adapter) < 1e-12:
        return "tie"
    return "adapter" if (adapter < base) == (metric in LOWER_IS_BETTER) else "base"


def _aggregate(rows: list[dict]) -> dict:
    """Wins/losses/ties from the adapter's side, and mean scores per metric."""
    from finetune.evaluate import LOWER_IS_BETTER

    agg = {"n": len(rows), "wins": 0, "losses": 0, "ties": 0, "metrics": {}}
    for r in rows:
        agg[{"adapter": "wins", "base": "losses", "tie": "ties"}[r["winner"]]] += 1
    for metric in sorted({r["metric"] for r in rows}):
        sel = [r["scores"] for r in rows if r["metric"] == metric]
        agg["metrics"][metric] = {"base": round(sum(s["base"] for s in sel) / len(sel), 4),
                                  "adapter": round(sum(s["adapter"] for s in sel) / len(sel), 4),
                                  "n": len(sel), "lower_is_better": metric in LOWER_IS_BETTER}
    return agg


def score(items: list[EvalItem], base_out: list[str], adapter_out: list[str]) -> dict:
    from finetune.evaluate import METRICS

    rows = []
    for it, b, a in zip(items, base_out, adapter_out):
        fn = METRICS[it.metric]
        s = {"base": round(fn(b, it.reference), 4), "adapter": round(fn(a, it.reference), 4)}
        rows.append({"id": it.id, "dataset": it.dataset, "modality": it.conv.modality(), "metric": it.metric,
                     "prompt": _prompt_text(it.conv), "reference": it.reference, "base": b, "adapter": a,
                     "scores": s, "winner": _winner(it.metric, s["base"], s["adapter"])})
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by["modality"][r["modality"]].append(r)
        by["dataset"][r["dataset"]].append(r)
    return {"items": rows,
            "by_modality": {k: _aggregate(v) for k, v in sorted(by["modality"].items())},
            "by_dataset": {k: _aggregate(v) for k, v in sorted(by["dataset"].items())},
            "summary": _aggregate(rows)}


def _prompt_text(conv: Conversation) -> str:
    def part(p: Part) -> str:
        return (p.text or "") if p.type == "text" else f"<{p.type}>"

    return "\n".join(f"{m.role}: " + "".join(map(part, m.parts)) for m in conv.messages[:-1])


# ---------------------------------------------------------------- report.html


def _png_uri(img, size: int = 192) -> str:
    thumb = img.copy()
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _wav_uri(wave) -> str:
    import soundfile as sf

    from data_tools.media import SAMPLE_RATE

    buf = io.BytesIO()
    sf.write(buf, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
table{border-collapse:collapse;margin:8px 0 20px}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}
.item{display:grid;grid-template-columns:2fr 1fr 1fr 1fr;gap:10px;background:#fff;border:1px solid #ddd;
border-left:6px solid #bbb;border-radius:4px;padding:10px;margin:10px 0}
.item.adapter{border-left-color:#2a9d3a}.item.base{border-left-color:#d33}
.head{grid-column:1/-1;color:#555;font-size:12px}.msg{white-space:pre-wrap;margin:2px 0}
.lbl{font-size:11px;color:#777;text-transform:uppercase}.ans{white-space:pre-wrap;font-family:monospace}
img{max-width:192px;max-height:192px;border:1px solid #ccc;display:block;margin:4px 0}
audio{display:block;margin:4px 0}
"""


def _agg_table(title: str, groups: dict) -> str:
    rows = []
    for name, g in groups.items():
        for metric, m in g["metrics"].items():
            arrow = "↓" if m["lower_is_better"] else "↑"
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{g['n']}</td><td>{g['wins']}</td>"
                        f"<td>{g['losses']}</td><td>{g['ties']}</td><td>{html.escape(metric)} {arrow}</td>"
                        f"<td>{m['base']:.3f}</td><td>{m['adapter']:.3f}</td></tr>")
    return (f"<h2>{html.escape(title)}</h2><table><tr><th></th><th>n</th><th>wins</th><th>losses</th>"
            f"<th>ties</th><th>metric</th><th>base</th><th>adapter</th></tr>{''.join(rows)}</table>")


def _item_html(row: dict, it: EvalItem) -> str:
    images, audios = iter(it.images), iter(it.audios)
    msgs = []
    for m in it.conv.messages[:-1]:
        body = []
        for p in m.parts:
            if p.type == "image":
                body.append(f'<img alt="image" src="{_png_uri(next(images))}">')
            elif p.type == "audio":
                body.append(f'<audio controls src="{_wav_uri(next(audios))}"></audio>')
            else:
                body.append(html.escape(p.text or ""))
        msgs.append(f'<div class="msg"><span class="lbl">{m.role}</span> {"".join(body)}</div>')
    s = row["scores"]

    def e(text: str) -> str:  # an empty answer is a result too (the model stopped at once)
        return html.escape(text) if text else '<span class="lbl">(empty)</span>'

    return (f'<div class="item {row["winner"]}"><div class="head">{e(row["id"])} · {e(row["dataset"])} · '
            f'{row["modality"]} · {e(row["metric"])} · winner: <b>{row["winner"]}</b></div>'
            f'<div>{"".join(msgs)}</div>'
            f'<div><div class="lbl">reference</div><div class="ans">{e(row["reference"])}</div></div>'
            f'<div><div class="lbl">base · {s["base"]:.3f}</div>'
            f'<div class="ans">{e(row["base"])}</div></div>'
            f'<div><div class="lbl">adapter · {s["adapter"]:.3f}</div>'
            f'<div class="ans">{e(row["adapter"])}</div></div></div>')


def write_report(path: Path, result: dict, items: list[EvalItem], title: str) -> Path:
    s = result["summary"]
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p><b>{s['n']}</b> items: adapter wins <b>{s['wins']}</b>, loses <b>{s['losses']}</b>, "
            f"ties <b>{s['ties']}</b>.</p>",
            _agg_table("Overall", {"all": s}), _agg_table("By modality", result["by_modality"]),
            _agg_table("By dataset", result["by_dataset"]), "<h2>Items</h2>"]
    body += [_item_html(row, it) for row, it in zip(result["items"], items)]
    path.write_text(f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                    f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>", encoding="utf-8")
    return path


# ---------------------------------------------------------------- eval


def cmd_eval(args) -> int:
    from finetune.adapters import load_adapter, open_adapter
    from finetune.model import load_base, load_processor
    from finetune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    # A missing, pickled, corrupt or other-base adapter fails now, not after the base's answers.
    open_adapter(args.adapter, base=recipe.model.base, allow_pickle=recipe.model.allow_pickle)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    m = recipe.model
    processor = load_processor(m.base, recipe.data.image_tokens, m.trust_remote_code)
    items, skipped = eval_items(recipe, processor, args.max_items or recipe.eval.max_items, log)
    if not items:
        raise UserError("eval_datasets", "no usable held-out items (chat records ending in an answer)",
                        "Add eval_datasets, or set data.eval_fraction")
    model = load_base(m.base, quantization=m.quantization, dtype=m.dtype, double_quant=m.double_quant,
                      quant_storage=m.quant_storage, trust_remote_code=m.trust_remote_code,
                      allow_pickle=m.allow_pickle)
    gen = {"max_new_tokens": recipe.eval.max_new_tokens, "image_tokens": recipe.data.image_tokens,
           "batch_size": recipe.eval.batch_size}
    base_out = generate_items(model, processor, items, **gen)
    model = load_adapter(model, args.adapter, allow_pickle=m.allow_pickle)
    adapter_out = generate_items(model, processor, items, **gen)

    result = score(items, base_out, adapter_out)
    result["summary"].update(skipped=skipped, adapter=str(args.adapter), base=m.base)
    out = Path(args.out or Path(recipe.train.output_dir) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    write_report(out / "report.html", result, items, f"{args.adapter} vs {m.base}")
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(_summary_table(result))
        print(f"wrote {out / 'eval.json'} and {out / 'report.html'}")
    return 0


def _summary_table(result: dict) -> str:
    lines = [f"{'':<12}{'n':>5}{'wins':>6}{'losses':>8}{'ties':>6}  metric        base  adapter"]
    for name, g in [("all", result["summary"]), *result["by_modality"].items()]:
        for metric, m in g["metrics"].items():
            lines.append(f"{name:<12}{g['n']:>5}{g['wins']:>6}{g['losses']:>8}{g['ties']:>6}  "
                         f"{metric:<12}{m['base']:>6.3f}{m['adapter']:>9.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- generate / chat


def _inference_model(adapter: str | None, base: str | None):
    """(model, processor, image_tokens). With an adapter, the base it was trained on (or
    `base`) in the quantization its run recorded (NF4 when unknown: QLoRA's default);
    without, `base` in full precision (a merged folder or a plain base)."""
    import yaml

    from finetune.adapters import load_adapter, open_adapter
    from finetune.model import load_base, load_processor

    if not adapter and not base:
        raise UserError("generate", "no model given",
                        "Pass --adapter DIR, or --base DIR for a merged or base model")
    quant, image_tokens = "none", None
    if adapter:
        base = open_adapter(adapter, base=base)[2]  # proven to fit before anything big loads
        quant = "nf4"
        lock = Path(adapter).parent / "recipe.lock.yaml"  # written by `finetune train` next to adapter/
        if lock.exists():
            run = yaml.safe_load(lock.read_text()) or {}
            quant = run.get("model", {}).get("quantization", quant)
            image_tokens = run.get("data", {}).get("image_tokens")
    processor = load_processor(base, image_tokens)
    model = load_base(base, quantization=quant)
    if adapter:
        model = load_adapter(model, adapter)
    model.eval()
    return model, processor, image_tokens or processor.image_processor.max_soft_tokens


def _media(kind: str, path: str):
    from data_tools.media import load_audio, load_image

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--{kind} {path}", "file not found" if not p.exists() else "not a file",
                        "Check the path")
    part = Part(kind, ref=str(p.resolve()), ref_kind="path")
    try:
        if kind == "image":
            return load_image(part, ".", max_pixels=50_000_000, max_bytes=100_000_000, allow_network=False)
        return load_audio(part, ".", max_seconds=30.0, policy="trim", max_bytes=100_000_000,
                          allow_network=False)
    except BadRecord as e:
        raise UserError(f"--{kind} {path}", e.detail, f"Pass a readable {kind} file") from None


_MARKER = re.compile(r"\{(image|audio)\}")


def user_parts(prompt: str, n_images: int, n_audios: int, order: list[str] | None = None) -> list[Part]:
    """Media go where `{image}`/`{audio}` markers put them, else before the prompt in `order`
    (the kinds in command-line order; default: images, then audio)."""
    counts = {"image": n_images, "audio": n_audios}
    marked = {k: prompt.count("{" + k + "}") for k in counts}
    for k, n in marked.items():
        if n and n != counts[k]:
            raise UserError("prompt", f"{n} {{{k}}} marker(s) but {counts[k]} --{k} file(s)",
                            f"Give one --{k} per {{{k}}} marker, or drop the markers")
    order = order or ["image"] * n_images + ["audio"] * n_audios
    parts = [Part(k) for k in order if not marked[k]]
    for i, piece in enumerate(_MARKER.split(prompt)):
        if i % 2:
            parts.append(Part(piece))
        elif piece.strip():
            parts.append(Part("text", text=piece))
    return parts


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    from finetune.generation import generate

    images = [_media("image", p) for p in args.image]  # bad paths fail before the model loads
    audios = [_media("audio", p) for p in args.audio]
    conv = Conversation([Message("user", user_parts(args.prompt, len(images), len(audios),
                                                    getattr(args, "media_order", None)))])
    model, processor, image_tokens = _inference_model(args.adapter, args.base)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate(model, processor, conv, images, audios, max_new_tokens=args.max_new_tokens,
             image_tokens=image_tokens, streamer=streamer)
    return 0


CHAT_HELP = "commands: /image PATH, /audio PATH (attach to your next message), /reset, /quit"


def cmd_chat(args) -> int:
    from finetune.generation import generate

    model, processor, image_tokens = _inference_model(args.adapter, args.base)
    interactive = sys.stdin.isatty()
    history: list[Message] = []
    images, audios, pending = [], [], []  # media of the whole history, in prompt order
    print(CHAT_HELP)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return 0
        line = line.strip()
        if not line:
            continue
        cmd, _, rest = line.partition(" ")
        if cmd in ("/image", "/audio"):
            kind = cmd[1:]
            try:
                media = _media(kind, rest.strip())
            except UserError as e:  # a typo must not end the conversation
                print(f"error: {e.line()}", file=sys.stderr)
                continue
            pending.append((kind, media))
            print(f"[{kind} attached: {rest.strip()}]")
            continue
        if cmd == "/reset":
            history, images, audios, pending = [], [], [], []
            print("[history cleared]")
            continue
        if cmd.startswith("/"):
            print(CHAT_HELP)
            continue
        parts = [Part(kind) for kind, _ in pending] + [Part("text", text=line)]
        images += [m for k, m in pending if k == "image"]
        audios += [m for k, m in pending if k == "audio"]
        pending = []
        history.append(Message("user", parts))
        answer = generate(model, processor, Conversation(list(history)), images, audios,
                          max_new_tokens=args.max_new_tokens, image_tokens=image_tokens)
        history.append(Message("assistant", [Part("text", text=answer)]))
        print(answer, flush=True)
