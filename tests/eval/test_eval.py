"""`finetune eval | generate | chat` on the tiny gemma4_unified.

A module-scoped fixture trains a small QLoRA adapter (20 steps on the demo's high/low tones)
once; eval, the report (in headless Chromium), generate and chat all use it. The random tiny
base answers with nothing useful, so after 20 steps the adapter beats it on held-out tones.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from finetune.cli.main import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny base + demo data: 24 training tones, 4 held-out images and 4 held-out tones."""
    from finetune.demo.data import make_demo_data
    from finetune.demo.tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("eval")
    data = make_demo_data(root / "data", seed=0, n_image=0, n_audio=24, n_text_repeat=0, n_mixed=0,
                          n_eval_each=4)
    # Media items only: the text questions (invented capitals) are not what this adapter learns.
    rows = [line for line in (data / "eval.jsonl").read_text().splitlines() if '"eval-text' not in line]
    (data / "eval_media.jsonl").write_text("\n".join(rows) + "\n")
    return SimpleNamespace(root=root, data=data, base=write_tiny_model(root / "base", seed=0),
                           image=next((data / "images").glob("eval_*.png")),
                           audio=next((data / "audio").glob("eval_*.wav")))


@pytest.fixture(scope="module")
def trained(assets):
    """A 20-step QLoRA adapter on the tones, and the recipe that made it (as a YAML file)."""
    from finetune.config.recipe import recipe_from_dict
    from finetune.training.loop import train

    root = assets.root
    raw = {"model": {"base": str(assets.base), "quantization": "nf4"},
           "datasets": [{"path": str(assets.data / "train_audio.jsonl")}],
           "eval_datasets": [{"path": str(assets.data / "eval_media.jsonl")}],
           "data": {"max_seq_len": 256, "image_tokens": 70, "cache_dir": str(root / "cache")},
           "lora": {"r": 16, "alpha": 32, "targets": ["attention", "mlp", "audio"]},
           "train": {"output_dir": str(root / "run"), "max_steps": 20, "lr": 3e-3, "batch_size": 4,
                     "warmup": 2, "gradient_checkpointing": False, "seed": 0},
           "eval": {"max_new_tokens": 4, "batch_size": 8}}
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    result = train(recipe_from_dict(raw), log=lambda *a: None)
    return SimpleNamespace(recipe=recipe_path, raw=raw, adapter=result.adapter_dir)


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    stdout = io.StringIO()
    real = sys.stdout
    sys.stdout = stdout  # capsys is function-scoped; this fixture is shared
    try:
        rc = main(["eval", str(trained.recipe), "--adapter", str(trained.adapter), "--out", str(out),
                   "--json"])
    finally:
        sys.stdout = real
    assert rc == 0
    return SimpleNamespace(out=out, printed=json.loads(stdout.getvalue()),
                           result=json.loads((out / "eval.json").read_text()))


# ---------------------------------------------------------------- units (no model)


def test_user_parts_place_media_by_marker_or_first():
    from finetune.cli.eval import user_parts

    parts = user_parts("Is {audio} like {image}?", 1, 1)
    kinds = [p.type if p.type != "text" else p.text.strip() for p in parts]
    assert kinds == ["Is", "audio", "like", "image", "?"]
    kinds = [p.type if p.type != "text" else p.text for p in user_parts("Compare them.", 2, 1)]
    assert kinds == ["image", "image", "audio", "Compare them."]
    # Only {image} marked: the clip goes first, the picture where the marker is.
    assert [p.type for p in user_parts("see {image}", 1, 1)] == ["audio", "text", "image"]


def test_generate_keeps_the_command_line_order_of_unmarked_media():
    from finetune.cli.eval import user_parts
    from finetune.cli.main import build_parser

    args = build_parser().parse_args(["generate", "--audio", "a.wav", "--image", "b.png", "--audio", "c.wav",
                                      "Which came first?"])
    assert args.audio == ["a.wav", "c.wav"] and args.image == ["b.png"]
    assert args.media_order == ["audio", "image", "audio"]
    parts = user_parts(args.prompt, len(args.image), len(args.audio), args.media_order)
    assert [p.type for p in parts] == ["audio", "image", "audio", "text"]
    # Marked kinds still go to their markers; the rest keep their order in front.
    parts = user_parts("Hear {audio} then {audio}.", 1, 2, args.media_order)
    assert [p.type for p in parts if p.type != "text"] == ["image", "audio", "audio"]


def test_winner_follows_metric_direction():
    from finetune.eval.evaluate import winner

    assert winner("exact_match", 0.0, 1.0) == "adapter"
    assert winner("token_f1", 0.5, 0.2) == "base"
    assert winner("cer", 0.5, 0.2) == "adapter"  # error rates: lower is better
    assert winner("wer", 0.3, 0.3) == "tie"


def test_generate_rejects_bad_input_before_loading(tmp_path, capsys):
    assert main(["generate", "--base", str(tmp_path), "--image", str(tmp_path / "nope.png"), "hi"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"^error: --image .*nope.png: file not found\. Check the path\.$", err, re.M)
    (tmp_path / "a.png").write_bytes(b"not a png")
    assert main(["generate", "--base", str(tmp_path), "--image", str(tmp_path / "a.png"), "hi"]) == 2
    assert "cannot decode image" in capsys.readouterr().err
    assert main(["generate", "hi"]) == 2
    assert "Pass --adapter DIR" in capsys.readouterr().err


# ---------------------------------------------------------------- generate


def test_generate_base_with_markers(assets, monkeypatch, capsys):
    """The base alone, full precision; markers put the clip first and the picture after."""
    import finetune.model.generate

    seen, real = [], finetune.model.generate.generate

    def spy(model, processor, chat, conv, images, audios, **kw):
        seen.append([p.type for p in conv.messages[0].parts])
        return real(model, processor, chat, conv, images, audios, **kw)

    monkeypatch.setattr(finetune.model.generate, "generate", spy)
    rc = main(["generate", "--base", str(assets.base), "--image", str(assets.image),
               "--audio", str(assets.audio), "--max-new-tokens", "3", "Hear {audio} and see {image}. Well?"])
    assert rc == 0 and seen == [["text", "audio", "text", "image", "text"]]
    assert capsys.readouterr().out.endswith("\n")  # the streamer finished its line
    rc = main(["generate", "--base", str(assets.base), "--image", str(assets.image), "{image} {image}"])
    assert rc == 2 and "2 {image} marker(s) but 1 --image file(s)" in capsys.readouterr().err


@pytest.mark.integration
def test_generate_adapter_streams_text(assets, trained, capsys):
    """4-bit base (read from adapter_config.json) + adapter, an image and a tone."""
    rc = main(["generate", "--adapter", str(trained.adapter), "--image", str(assets.image),
               "--audio", str(assets.audio), "--max-new-tokens", "4", "Is this tone high or low?"])
    assert rc == 0
    assert capsys.readouterr().out.strip()  # the adapter learned to answer in words


# ---------------------------------------------------------------- eval


@pytest.mark.integration
def test_eval_json_per_item_and_adapter_wins(evaluated):
    r = evaluated.result
    assert evaluated.printed == r
    assert set(r) >= {"items", "by_modality", "summary", "by_dataset"}
    assert len(r["items"]) == 8 and {i["modality"] for i in r["items"]} == {"image", "audio"}
    for item in r["items"]:
        assert set(item) >= {"id", "modality", "reference", "base", "adapter", "scores", "winner"}
        b, a = item["scores"]["base"], item["scores"]["adapter"]
        # exact_match: higher wins
        assert item["winner"] == ("tie" if a == b else "adapter" if a > b else "base")
    s = r["summary"]
    assert s["wins"] == sum(i["winner"] == "adapter" for i in r["items"])
    assert s["wins"] + s["losses"] + s["ties"] == s["n"] == 8
    audio = r["by_modality"]["audio"]
    assert audio["n"] == 4 and audio["wins"] > audio["losses"]
    m = audio["metrics"]["exact_match"]
    assert m["adapter"] > m["base"], r["items"]  # held-out tones: the adapter beats the base
    em = s["metrics"]["exact_match"]
    assert em["adapter"] >= em["base"]


@pytest.mark.integration
def test_eval_batched_equals_one_by_one(trained):
    """Left-padded batches give the same greedy answers as one prompt at a time."""
    from finetune.config.recipe import recipe_from_dict
    from finetune.eval.evaluate import eval_items
    from finetune.model.adapters import load_adapter
    from finetune.model.families import GEMMA4_UNIFIED
    from finetune.model.generate import generate, generate_items
    from finetune.model.load import load_base, load_processor

    chat = GEMMA4_UNIFIED.chat
    recipe = recipe_from_dict(trained.raw)
    processor = load_processor(recipe.model.base, 70)
    items, skipped = eval_items(recipe, processor, chat)
    assert skipped == 0 and len(items) == 8
    model = load_adapter(load_base(recipe.model.base, quantization="nf4"), str(trained.adapter))
    batched = generate_items(model, processor, chat, items, max_new_tokens=4, image_tokens=70, batch_size=8)
    single = [generate(model, processor, chat, it.conv, it.images, it.audios, max_new_tokens=4, image_tokens=70)
              for it in items]
    assert batched == single


def test_eval_items_follow_the_trainers_held_out_split(assets, tmp_path):
    """No eval_datasets: exactly the records the data pipeline held out (data.eval_fraction)."""
    from data_tools.pipeline import prepare
    from finetune.config.recipe import recipe_from_dict
    from finetune.eval.evaluate import eval_items
    from finetune.model.families import GEMMA4_UNIFIED
    from finetune.model.load import load_processor

    recipe = recipe_from_dict({
        "model": {"base": str(assets.base)}, "datasets": [{"path": str(assets.data / "train_audio.jsonl")}],
        "data": {"image_tokens": 70, "eval_fraction": 0.25, "cache_dir": str(tmp_path / "cache")},
        "train": {"output_dir": str(tmp_path / "run")}})
    processor = load_processor(str(assets.base), 70)
    items, _ = eval_items(recipe, processor, GEMMA4_UNIFIED.chat)
    held = prepare(recipe, processor, str(assets.base), chat=GEMMA4_UNIFIED.chat,
                   rejects_path=tmp_path / "rejects.jsonl", log=None).eval
    assert len(items) == 6
    assert {it.conv.origin for it in items} == {held[i]["origin"] for i in range(len(held))}


# ---------------------------------------------------------------- report.html in Chromium


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.integration
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian chromium (.ci/install_browser.sh)")
def test_report_renders_media_in_chromium(evaluated, tmp_path):
    import numpy as np
    import soundfile as sf
    from PIL import Image

    report = evaluated.out / "report.html"
    dom = _chromium(tmp_path, "--dump-dom", report.as_uri()).stdout
    items = evaluated.result["items"]
    n_image = sum(i["modality"] == "image" for i in items)
    n_audio = sum(i["modality"] == "audio" for i in items)
    imgs = re.findall(r'<img[^>]*src="data:image/png;base64,([^"]+)"', dom)
    audios = re.findall(r'<audio[^>]*src="data:audio/wav;base64,([^"]+)"', dom)
    assert len(imgs) == n_image == dom.count("<img") and len(audios) == n_audio == dom.count("<audio")
    assert Image.open(io.BytesIO(base64.b64decode(imgs[0]))).size[0] > 0
    wave, rate = sf.read(io.BytesIO(base64.b64decode(audios[0])))
    assert rate == 16000 and len(wave) > 1000
    for item in items:  # every answer is on the page (escaped text survives the round trip)
        assert all(html.escape(t, quote=False) in dom for t in (item["reference"], item["adapter"]))
    assert "By modality" in dom and "By dataset" in dom

    shot = tmp_path / "report.png"
    _chromium(tmp_path, "--window-size=1200,1600", f"--screenshot={shot}", report.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.var() > 0


# ---------------------------------------------------------------- chat


@pytest.mark.integration
def test_chat_keeps_history_and_resets(assets, trained, monkeypatch, capsys):
    import finetune.model.generate

    calls, answers = [], []
    real = finetune.model.generate.generate

    def spy(model, processor, chat, conv, images, audios, **kw):
        calls.append((len(conv.messages), len(images), len(audios)))
        answers.append(real(model, processor, chat, conv, images, audios, **kw))
        return answers[-1]

    monkeypatch.setattr(finetune.model.generate, "generate", spy)
    script = "\n".join([f"/image {assets.image}", "What colour is this?", "/image /no/such.png",
                        f"/audio {assets.audio}", "Is this tone high or low?", "/reset",
                        "Is it high or low?", "/quit", "never read"]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["chat", "--adapter", str(trained.adapter), "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    # (messages in the prompt, images in the history, clips in the history) per turn
    assert calls == [(1, 1, 0), (3, 1, 1), (1, 0, 0)]
    assert "[history cleared]" in out and "error: --image /no/such.png: file not found" in err
    lines = out.splitlines()
    assert all(a in lines for a in answers) and any(answers)
