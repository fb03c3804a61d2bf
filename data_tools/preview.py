"""`finetune data preview`: one self-contained HTML page of what the model will be trained on.

On top, the accounting of the whole recipe (records, used, rejected by reason, overflow
actions, tokens by kind) and a length histogram per modality (inline SVG). Below, the first
`n` records, taken in turn from each dataset: image thumbnails and audio players (data: URLs,
so the page is one file that opens anywhere), the token sequence with text, image and audio
spans and the label tokens highlighted (a media span is one chip, "[image ×64]"), the labelled
spans decoded one by one, and what overflow did, or why the record was rejected.

`write_jsonl` writes the same samples one line each: `{"id", "text", "labels", "steps"}`, `text`
the decoded sequence (the conversation as its last step is served) with each media block
shortened to its one placeholder (`<|image|>`: what the chat template wrote), `labels` what each
step writes, in order, and `steps` each step's served prompt and completion
(`data_tools.steps`: earlier steps served apart are branches of the sample).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from data_tools.accounting import dataset_name
from data_tools.conversation import BadRecord
from data_tools.media import SAMPLE_RATE
from data_tools.pipeline import prepare
from data_tools.render import IGNORE, ChatFormat
from data_tools.render_pool import RecordWorker, one_thread, records
from data_tools.steps import main_length, step_ids

KINDS = {1: "image", 2: "video", 3: "audio"}
COLOURS = {"text": "#4c78a8", "image": "#f58518", "audio": "#54a24b", "mixed": "#b279a2", "video": "#e45756"}
THUMB = 160


def write_preview(recipe, processor, out: str, *, recipe_path: str, processor_dir: str,
                  chat: ChatFormat, rejects_path: Path, n: int = 20, jsonl: str | None = None) -> Path:
    """Render the recipe's data (cached like a run) and write the page to `out` (and with
    `jsonl`, the same samples there, see `write_jsonl`).

    `recipe` is loaded, `processor` loaded from `processor_dir` (hashed into the cache key),
    `chat` is the model family's chat format; `recipe_path` names the recipe on the page.
    """
    # The stats need the full pass; a streaming recipe gets it without writing a cache. No yield
    # rule: the page is where one looks at what a run would lose, and why.
    prep = prepare(recipe, processor, processor_dir, rejects_path=rejects_path, chat=chat, log=None,
                   streaming=False, use_cache=not recipe.data.streaming, check=False)
    items = preview_items(recipe, processor, chat, n)
    page = render_page(str(recipe_path), prep.stats, items, processor.tokenizer)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    if jsonl:
        write_jsonl(items, processor, jsonl)
    return path


def write_jsonl(items: list[dict], processor, out: str) -> Path:
    """One line per rendered sample of `items`: `{"id", "text", "labels", "steps"}` (module doc)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            if "sample" in it:
                f.write(json.dumps({"id": it["id"], **sample_view(it["sample"], processor)},
                                   ensure_ascii=False) + "\n")
    return path


def sample_view(sample: dict, processor) -> dict:
    """{"text": the conversation as its last step is served, decoded, each media block as its one
    placeholder; "labels": what each step writes, in order; "steps": [{"prompt", "completion"}],
    each step's served prompt (decoded the same way) and its labelled text}."""
    tok = processor.tokenizer
    steps = [{"prompt": shown(prompt, processor), "completion": tok.decode(done, skip_special_tokens=False)}
             for prompt, done in step_ids(sample)]
    return {"text": shown(sample["input_ids"][: main_length(sample)], processor),
            "labels": [s["completion"] for s in steps], "steps": steps}


def shown(ids: list[int], processor) -> str:
    """`ids` decoded with special tokens, each media block (boundary, N placeholders, boundary)
    shortened to its one placeholder, as the chat template wrote it."""
    tok = processor.tokenizer
    ends = {tok.convert_tokens_to_ids(processor.boi_token): (tok.convert_tokens_to_ids(processor.eoi_token),
                                                             processor.image_token),
            tok.convert_tokens_to_ids(processor.boa_token): (tok.convert_tokens_to_ids(processor.eoa_token),
                                                             processor.audio_token)}
    pieces, run, i = [], [], 0
    while i < len(ids):
        if ids[i] in ends:
            close, placeholder = ends[ids[i]]
            j = ids.index(close, i) if close in ids[i:] else len(ids) - 1
            pieces += [tok.decode(run, skip_special_tokens=False), placeholder]
            run, i = [], j + 1
            continue
        run.append(ids[i])
        i += 1
    pieces.append(tok.decode(run, skip_special_tokens=False))
    return "".join(pieces)


def preview_items(recipe, processor, chat: ChatFormat, n: int) -> list[dict]:
    """The first `n` records, one dataset after another in turn, rendered or rejected."""
    worker = RecordWorker(processor, recipe.data, chat)
    streams = [records([spec], names=[dataset_name(i, spec)]) for i, spec in enumerate(recipe.datasets)]
    items = []
    while streams and len(items) < n:
        for it in list(streams):
            item = next(it, None)
            if item is None:
                streams.remove(it)
            elif len(items) < n:
                items.append(_one(worker, item))
    return items


def _one(worker: RecordWorker, item) -> dict:
    origin, record, _, _, dataset = item
    rid = record.get("id") if isinstance(record, dict) else None
    out = {"origin": origin, "dataset": dataset, "images": [], "audios": [],
           "id": str(rid) if isinstance(rid, (str, int)) else origin}
    try:
        conv, out["images"], out["audios"] = worker.load(item)
        out["modality"] = conv.modality()
        with one_thread():
            out["sample"] = worker.renderer.render(conv, out["images"], out["audios"])
    except BadRecord as e:
        out["rejected"] = (e.reason, e.detail)
    return out


# ---------------------------------------------------------------- HTML pieces


def _png_data_url(img) -> str:
    thumb = img.copy()
    thumb.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    thumb.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _wav_data_url(wave: np.ndarray, rate: int = SAMPLE_RATE) -> str:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1, 1), rate, format="WAV", subtype="PCM_16")  # what the model hears
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def _histogram_svg(edges: list[float], counts: list[int], title: str, colour: str) -> str:
    w, h, pad = 280, 120, 22
    top = max(counts) or 1
    bw = (w - 2 * pad) / len(counts)
    bars = "".join(
        f'<rect x="{pad + i * bw:.1f}" y="{h - pad - (c / top) * (h - 2 * pad):.1f}" width="{bw - 1:.1f}" '
        f'height="{(c / top) * (h - 2 * pad):.1f}" fill="{colour}">'
        f'<title>{edges[i]:.0f}–{edges[i + 1]:.0f}: {c}</title></rect>' for i, c in enumerate(counts))
    return (f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img"><text x="{pad}" y="14" '
            f'class="t">{html.escape(title)} ({sum(counts)})</text>{bars}'
            f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>'
            f'<text x="{pad}" y="{h - 6}" class="a">{edges[0]:.0f}</text>'
            f'<text x="{w - pad}" y="{h - 6}" class="a" text-anchor="end">{edges[-1]:.0f} tokens</text>'
            f'<text x="{pad - 3}" y="{pad + 4}" class="a" text-anchor="end">{top}</text></svg>')


def _counter(d: dict) -> str:
    return ", ".join(f"{html.escape(str(k))} {v}" for k, v in sorted(d.items())) or "none"


def _stats_html(stats: dict) -> str:
    t = stats["total"]
    rows = [("records", t["records"]), ("used", t["used"]), ("rejected", t["rejected"]),
            ("rejected by reason", _counter(t["rejected_by_reason"])),
            ("overflow actions", _counter(t["overflow_actions"])),
            ("tokens", ", ".join(f"{k} {t['tokens'].get(k, 0)}" for k in ("text", "image", "audio",
                                                                           "label"))),
            ("samples by modality", _counter(t.get("by_modality", {}))),
            ("length", ", ".join(f"{k} {v}" for k, v in t.get("length_percentiles", {}).items()) or "none")]
    if stats.get("eval"):
        e = stats["eval"]
        rows.append(("eval set", f"{e['records']} records, {e['used']} used, {e['rejected']} rejected"))
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    per = "".join(f"<tr><td>{html.escape(name)}</td><td>{d['records']}</td><td>{d['used']}</td>"
                  f"<td>{d['rejected']}</td><td>{_counter(d['rejected_by_reason'])}</td></tr>"
                  for name, d in stats.get("datasets", {}).items())
    hist = t.get("length_histogram") or {}
    svgs = "".join(_histogram_svg(hist["edges"], c, m, COLOURS.get(m, "#777"))
                   for m, c in hist.get("counts", {}).items())
    return (f'<section class="stats"><table>{table}</table><table class="per"><tr><th>dataset</th>'
            f'<th>records</th><th>used</th><th>rejected</th><th>by reason</th></tr>{per}</table></section>'
            f'<section class="hist">{svgs}</section>')


def _tokens_html(sample: dict, tokenizer) -> str:
    ids, labels, types = sample["input_ids"], sample["labels"], sample["mm_token_type_ids"]
    special = set(tokenizer.all_special_ids)
    names = tokenizer.convert_ids_to_tokens(ids)
    out, i = [], 0
    while i < len(ids):
        if types[i] != 0:  # a whole media span as one chip
            j = i
            while j < len(ids) and types[j] == types[i]:
                j += 1
            kind = KINDS.get(types[i], "media")
            out.append(f'<span class="chip {kind}">[{kind} ×{j - i}]</span>')
            i = j
            continue
        text = names[i].replace("▁", " ")
        cls = "tok" + (" lab" if labels[i] != IGNORE else "") + (" sp" if ids[i] in special else "")
        shown = html.escape(text).replace("\n", "↵")
        out.append(f'<span class="{cls}" title="id {ids[i]}">{shown}</span>')
        if "\n" in text:
            out.append("<br>")
        i += 1
    return "".join(out)


def _spans_html(sample: dict, tokenizer) -> str:
    spans = [tokenizer.decode(done, skip_special_tokens=False) for _, done in step_ids(sample)]
    rows = "".join(f"<li><code>{html.escape(s).replace(chr(10), '↵')}</code></li>" for s in spans)
    return f'<details class="spans"><summary>{len(spans)} labelled span(s)</summary><ol>{rows}</ol></details>'


def _item_html(k: int, item: dict, tokenizer) -> str:
    head = f"#{k + 1} · {html.escape(item['origin'])} · {html.escape(item['dataset'])}"
    media = "".join(f'<img src="{_png_data_url(im)}" alt="image {j + 1}">'
                    for j, im in enumerate(item["images"]))
    media += "".join(f'<audio controls src="{_wav_data_url(a)}"></audio>'
                     f'<span class="dur">{len(a) / SAMPLE_RATE:.2f} s</span>' for a in item["audios"])
    if "rejected" in item:
        reason, detail = item["rejected"]
        status = f'<span class="bad">rejected: {html.escape(reason)}</span> {html.escape(detail)}'
        body = ""
    else:
        s = item["sample"]
        n_lab = sum(1 for x in s["labels"] if x != IGNORE)
        how = "warn" if s["overflow"] != "none" else "ok"
        status = (f'{item["modality"]} · {len(s["input_ids"])} tokens · {n_lab} labelled · overflow: '
                  f'<span class="{how}">{html.escape(s["overflow"])}</span>'
                  + (f' · image budget {s["image_budget"]}' if s.get("image_budget") else ""))
        body = f'<div class="toks">{_tokens_html(s, tokenizer)}</div>{_spans_html(s, tokenizer)}'
    return (f'<div class="sample"><div class="head">{head}</div><div class="status">{status}</div>'
            f'<div class="media">{media}</div>{body}</div>')


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;margin:0 24px 12px 0;display:inline-table;vertical-align:top}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;background:#fff}
svg{background:#fff;border:1px solid #ddd;margin:0 8px 8px 0}
svg .t{font:12px sans-serif} svg .a{font:10px sans-serif;fill:#555}
.sample{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px;margin:12px 0}
.head{font-weight:600} .status{color:#444;margin:4px 0}
.media img{border:1px solid #ccc;margin:4px 8px 4px 0;vertical-align:middle}
.media audio{vertical-align:middle;margin:4px 4px 4px 0} .dur{color:#666;margin-right:12px}
.toks{font:12px/1.9 ui-monospace,monospace;white-space:pre-wrap;word-break:break-all}
.tok{border:1px solid #e2e2e2;border-radius:3px;padding:0 1px;margin:0 1px}
.tok.lab{background:#c7f0c2;border-color:#5cb85c} .tok.sp{color:#8a3ffc}
.chip{display:inline-block;border-radius:10px;padding:0 8px;margin:0 2px;color:#fff;font-weight:600}
.chip.image{background:#f58518} .chip.audio{background:#54a24b} .chip.video{background:#e45756}
.bad{color:#fff;background:#d9534f;border-radius:3px;padding:0 4px}
.warn{color:#b35c00;font-weight:600} .ok{color:#2a7a2a}
.legend span{margin-right:10px}
.spans{margin-top:6px} .spans code{background:#c7f0c2;white-space:pre-wrap}
"""


def render_page(recipe_path: str, stats: dict, items: list[dict], tokenizer) -> str:
    legend = ('<div class="legend"><span class="tok">text</span><span class="tok lab">label</span>'
              '<span class="tok sp">special</span><span class="chip image">[image ×N]</span>'
              '<span class="chip audio">[audio ×N]</span></div>')
    samples = "".join(_item_html(k, it, tokenizer) for k, it in enumerate(items))
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>data preview: '
            f'{html.escape(recipe_path)}</title><style>{CSS}</style></head><body>'
            f'<h1>Data preview: {html.escape(recipe_path)}</h1>{_stats_html(stats)}'
            f'<h2>First {len(items)} records</h2>{legend}{samples}</body></html>')
