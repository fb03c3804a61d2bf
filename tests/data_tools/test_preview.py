"""`finetune data preview`: the page's content, and the page in a real headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import yaml
from PIL import Image

from finetune.cli.main import main

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
N = 10  # two rounds over the five datasets below


@pytest.fixture
def page(tiny_base, demo_data, tmp_path):
    """The preview of the demo's four train files plus one with a missing image, via the CLI."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "path": p}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"}]}) + "\n" for p in ("nope.png", "nope2.png")))
    files = [demo_data / f"train_{k}.jsonl" for k in ("image", "audio", "text", "mixed")] + [bad]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"base": str(tiny_base)}, "datasets": [{"path": str(f)} for f in files],
        "data": {"image_tokens": 70, "max_seq_len": 256, "on_bad_record": "skip",
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"output_dir": str(tmp_path / "out")}}))
    out = tmp_path / "preview.html"
    assert main(["data", "preview", str(recipe), "--out", str(out), "--n", str(N),
                 "--jsonl", str(tmp_path / "preview.jsonl")]) == 0
    return out


def test_page_has_stats_histograms_media_and_highlighted_tokens(page):
    text = page.read_text()
    # 2 image + 2 mixed records carry an image each; 2 audio + 2 mixed an audio clip each.
    assert text.count("<img ") == 4 and text.count("<audio ") == 4
    assert text.count('src="data:image/png;base64,') == 4 and text.count('src="data:audio/wav;base64,') == 4
    assert "<th>records</th><td>30</td>" in text and "missing_media 2" in text
    assert len(re.findall(r'class="sample"', text)) == N
    assert text.count("rejected: missing_media") == 2
    for kind in ("image", "audio"):  # a media span is one chip
        assert re.search(rf'class="chip {kind}">\[{kind} ×\d+\]', text)
    assert 'class="tok lab"' in text and "<svg" in text and "http" not in text.split("<body>")[1]


def test_jsonl_has_each_sample_as_text_and_labelled_spans(page, processor, make_recipe):
    """One line per rendered sample: the decoded text (a media block as its one placeholder) is
    exactly what the chat template wrote, and the labels are the decoded labelled spans."""
    from data_tools.formats import parse_record
    from data_tools.render import Renderer, RenderSettings
    from finetune.model.families import GEMMA4_UNIFIED

    rows = [json.loads(line) for line in (page.parent / "preview.jsonl").read_text().splitlines()]
    assert len(rows) == N - 2  # the two rejected records have no sample
    r = Renderer(processor, RenderSettings(), GEMMA4_UNIFIED.chat)
    by_id = {}
    recipe = yaml.safe_load((page.parent / "r.yaml").read_text())
    for spec in recipe["datasets"]:
        for line in open(spec["path"]):
            rec = json.loads(line)
            by_id[rec.get("id")] = rec
    kinds = set()
    for row in rows:
        assert set(row) == {"id", "text", "labels", "steps"}
        conv = parse_record(by_id[row["id"]], "messages", "x", ".")
        assert row["text"] == r.text_and_labels(conv)[0]
        assert row["labels"] == [conv.messages[-1].text() + "<turn|>"]
        assert row["steps"] == [{"prompt": r.prompt_text(conv), "completion": row["labels"][0]}]
        assert "<|image>" not in row["text"] and "<|audio>" not in row["text"]
        kinds |= {k for k in ("<|image|>", "<|audio|>") if k in row["text"]}
    assert kinds == {"<|image|>", "<|audio|>"}
    text = page.read_text()  # the page lists the same spans
    assert text.count("labelled span(s)</summary>") == N - 2
    assert all(f"<li><code>{html.escape(span)}</code></li>" in text for row in rows for span in row["labels"])


@pytest.mark.browser
@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Debian chromium")
def test_page_loads_in_headless_chromium(page, tmp_path):
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000"]
    url = page.as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<img ") == 4 and dom.count("<audio ") == 4
    assert "Data preview" in dom and dom.count('class="sample"') == N
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.uint32)
    assert pixels.shape[0] > 100 and pixels.var() > 0
    colours = np.unique(pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2])
    assert len(colours) > 20  # text, chips, thumbnails: not one flat colour
