"""`report.html` of an eval: aggregates and every item with its media, in one file.

Media are inlined as data: URLs, so the page can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from finetune.eval.evaluate import EvalItem


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


def _drafter_table(d: dict) -> str:
    """Acceptance of the drafters (result["drafter"], finetune.drafter.acceptance)."""
    rows = "".join(
        f"<tr><td>{p['target']}</td><td>{p['drafter']}</td><td>{p['tokens_per_forward']:.3f}</td>"
        f"<td>{p['mean_accepted']:.3f}</td><td>{p['acceptance_rate']:.3f}</td>"
        f"<td>{'yes' if p['identical'] else '<b>NO</b>'}</td><td>{html.escape(str(p['path']))}</td></tr>"
        for p in d["pairings"])
    return (f"<h2>Drafter acceptance (k = {d['k']}, {d['items']} prompts, {d['new_tokens']} new tokens"
            f"{' past the end of turn' if d['ignore_eos'] else ''})</h2><table><tr><th>target</th><th>drafter</th>"
            "<th>tokens / target forward</th><th>accepted / round</th><th>acceptance rate</th>"
            f"<th>output = plain greedy</th><th>drafter</th></tr>{rows}</table>")


def _agent_table(a: dict) -> str:
    """The agent loop on tool-use items (result["agent"], finetune.eval.agent)."""
    def cell(v):
        return "–" if v is None else f"{v:.3f}"
    rows = "".join(f"<tr><td>{side}</td><td>{a[side]['n']}</td><td>{cell(a[side]['call_accuracy'])}</td>"
                   f"<td>{cell(a[side]['final_exact'])}</td></tr>" for side in ("base", "adapter"))
    return ("<h2>Tool use as an agent loop</h2><table><tr><th>model</th><th>items</th><th>call accuracy "
            f"(per step)</th><th>final answer exact</th></tr>{rows}</table>")


def write_report(path: Path, result: dict, items: list[EvalItem], title: str) -> Path:
    s = result["summary"]
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p><b>{s['n']}</b> items: adapter wins <b>{s['wins']}</b>, loses <b>{s['losses']}</b>, "
            f"ties <b>{s['ties']}</b>.</p>",
            _agg_table("Overall", {"all": s}), _agg_table("By modality", result["by_modality"]),
            _agg_table("By dataset", result["by_dataset"]),
            *([_agent_table(result["agent"])] if "agent" in result else []),
            *([_drafter_table(result["drafter"])] if "drafter" in result else []), "<h2>Items</h2>"]
    body += [_item_html(row, it) for row, it in zip(result["items"], items)]
    path.write_text(f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                    f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>", encoding="utf-8")
    return path
