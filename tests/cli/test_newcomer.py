"""A newcomer's first hour: stale caches, paths, wrong formats, thin validation, overwrites.
Each test failed before its fix (issue: a newcomer's first hour)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from finetune.cli.main import main


def _image(path: Path, colour=(200, 30, 30)) -> None:
    Image.new("RGB", (64, 64), colour).save(path)


def _image_record(rel: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "path": rel},
                                                      {"type": "text", "text": "What colour?"}]},
                         {"role": "assistant", "content": "red"}]}


def _write_recipe(folder: Path, base: Path, datasets: list, **sections) -> Path:
    raw = {"model": {"base": str(base), "quantization": "none"}, "datasets": datasets,
           "data": {"max_seq_len": 256, "image_tokens": 70, "on_bad_record": "skip", **sections.pop("data", {})},
           "train": {"output_dir": "run", "max_steps": 1, "batch_size": 1, **sections.pop("train", {})}, **sections}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _stats(recipe: Path, capsys, *extra) -> tuple[int, dict | None, str]:
    rc = main(["data", "stats", str(recipe), "--json", *extra])
    captured = capsys.readouterr()
    return rc, json.loads(captured.out.splitlines()[0]) if captured.out.strip() else None, captured.err


# ---------------------------------------------------------------- 1. stale cache


def test_replacing_or_adding_media_refreshes_the_cache(tmp_path, tiny_base, capsys):
    proj = tmp_path / "proj"
    (proj / "img").mkdir(parents=True)
    (proj / "data.jsonl").write_text("\n".join(json.dumps(_image_record(f"img/{n}.png")) for n in ("a", "b")) + "\n")
    _image(proj / "img" / "a.png")
    (proj / "img" / "b.png").write_bytes(b"not a png")  # corrupt
    recipe = _write_recipe(proj, tiny_base, [{"path": "data.jsonl"}])
    rc, first, _ = _stats(recipe, capsys)
    assert (first["used"], first["rejected_by_reason"]) == (1, {"corrupt_media": 1})
    _image(proj / "img" / "b.png")  # replaced by a good picture: the cache must not hide it
    rc, second, _ = _stats(recipe, capsys)
    assert (second["used"], second["rejected"]) == (2, 0)
    (proj / "data.jsonl").write_text((proj / "data.jsonl").read_text() + json.dumps(_image_record("img/c.png")) + "\n")
    rc, third, _ = _stats(recipe, capsys)
    assert third["rejected_by_reason"] == {"missing_media": 1}
    _image(proj / "img" / "c.png")  # the missing file added
    rc, fourth, _ = _stats(recipe, capsys)
    assert (fourth["used"], fourth["rejected"]) == (3, 0)


def test_cache_location_is_printed_and_can_be_bypassed_or_cleared(tmp_path, tiny_base, capsys):
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "yo"}]}) + "\n")
    recipe = _write_recipe(proj, tiny_base, [{"path": "d.jsonl"}])
    from finetune.config.recipe import load_recipe

    cache_root = Path(load_recipe(recipe).data.cache_dir)
    assert cache_root == proj / ".cache" / "finetune-data"  # next to the run folder, as documented
    assert main(["data", "stats", str(recipe)]) == 0
    assert len(list(cache_root.iterdir())) == 1
    assert main(["data", "clear-cache", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "removed" in out and str(cache_root) in out and not list(cache_root.iterdir())
    assert main(["data", "stats", str(recipe), "data.cache=false"]) == 0
    assert not list(cache_root.iterdir())  # bypassed: nothing written


# ---------------------------------------------------------------- 2. paths


def test_recipe_paths_resolve_against_the_recipe_folder_from_anywhere(tmp_path, tiny_base, monkeypatch, capsys):
    proj = tmp_path / "proj"
    images = tmp_path / "elsewhere" / "images"  # LLaVA-style: media kept apart from the records
    (proj / "data").mkdir(parents=True)
    images.mkdir(parents=True)
    _image(images / "x.png")
    (proj / "data" / "train.jsonl").write_text(json.dumps(_image_record("x.png")) + "\n")
    recipe = _write_recipe(proj, tiny_base, [{"path": "data/*.jsonl", "media_root": "../elsewhere/images"}])
    monkeypatch.chdir(tmp_path)  # neither the recipe's folder nor the data's
    rc, stats, _ = _stats(recipe, capsys)
    assert rc == 0 and (stats["used"], stats["rejected"]) == (1, 0)
    assert (proj / "run" / "rejects.jsonl").exists()  # output_dir: run, next to the recipe
    # an absolute glob works like a relative one
    rc, stats, _ = _stats(recipe, capsys, f"datasets.0.path={proj}/data/*.jsonl")
    assert rc == 0 and stats["used"] == 1


# ---------------------------------------------------------------- 4./5. validate


def test_a_wrong_format_is_named_before_any_model_loads(tmp_path, tiny_base, capsys):
    llava = [{"id": str(i), "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}]} for i in range(5)]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    recipe = _write_recipe(tmp_path, tiny_base, [{"path": "llava.json", "format": "messages"}])
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert ("error: datasets[0].format: 5 of the first 5 records of "
            f"{tmp_path / 'llava.json'} are not 'messages' records; they look like 'sharegpt'. Set format: sharegpt.") in err
    assert main(["train", str(recipe)]) == 2  # the same, before a model is loaded
    assert "they look like 'sharegpt'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "adapter").exists()
    rc, _, err = _stats(recipe, capsys)  # no usable sample is an error, not "0 used" and exit 0
    assert rc == 2 and "yielded no usable sample" in err


def test_validate_reads_records_targets_and_trackers(tmp_path, tiny_base, capsys):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    rows = [json.dumps(good)] + ['{"messages": [{"role": "user", "content": "no answer"}]}'] * 2 + ["{broken"]
    (tmp_path / "d.jsonl").write_text("\n".join(rows * 2) + "\n")
    recipe = _write_recipe(tmp_path, tiny_base, [{"path": "d.jsonl"}], data={"on_bad_record": "error"},
                           lora={"targets": ["attn", "mlp"]}, train={"report_to": ["wandb"]})
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("error: lora.targets[0]: 'attn' matches no module of") for line in err)
    assert not any("lora.targets[1]" in line for line in err)
    if importlib.util.find_spec("wandb") is None:
        assert "error: train.report_to[0]: wandb is not installed, so nothing would be logged there. " \
               "pip install wandb, or remove it from train.report_to." in err
    bad = [line for line in err if "bad record" in line]
    assert len(bad) == 6 and f"{tmp_path / 'd.jsonl'}:2" in bad[0]  # every bad record of the sample


# ---------------------------------------------------------------- 6. overwrites


def test_train_refuses_to_replace_a_run_and_eval_gets_its_own_folder(tmp_path, tiny_base, capsys):
    from finetune.cli.eval import default_eval_dir

    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]}) + "\n")
    recipe = _write_recipe(tmp_path, tiny_base, [{"path": "d.jsonl"}])
    assert main(["train", str(recipe)]) == 0
    adapter = tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    before = adapter.read_bytes()
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    assert (f"error: train.output_dir: {tmp_path / 'run'} already holds a run (adapter, checkpoints). Pass --resume "
            "to continue it, --overwrite to replace it, or choose a new train.output_dir.") in capsys.readouterr().err
    assert adapter.read_bytes() == before
    assert main(["train", str(recipe), "--overwrite", "train.seed=5"]) == 0
    assert adapter.read_bytes() != before
    assert default_eval_dir(tmp_path / "run" / "adapter") == tmp_path / "run" / "eval"
    step = tmp_path / "run" / "checkpoints" / "step-1" / "adapter"
    assert default_eval_dir(step) == step.parent / "eval"
    assert default_eval_dir(tmp_path / "mine") == tmp_path / "mine-eval"


# ---------------------------------------------------------------- 3. shipped recipes on the CPU

SHIPPED = sorted((Path(__file__).resolve().parents[2] / "recipes").rglob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in SHIPPED if p.parent.name == "gemma4-12b"], ids=lambda p: p.name)
def test_every_shipped_recipe_trains_a_step_on_the_cpu(path, tmp_path, tiny_base, demo_data):
    """The 12B recipes as written (bf16, NF4, 8-bit AdamW, their LoRA targets, packing...), pointed
    at the tiny base and the demo data: one optimizer step on the CPU."""
    from finetune.config.recipe import load_recipe
    from finetune.training.loop import train

    fmt = yaml.safe_load(path.read_text())["datasets"][0]["format"]
    files = [demo_data / "train_text.jsonl"] if fmt == "text" else sorted(demo_data.glob("train_*.jsonl"))
    if fmt == "preference":
        from finetune.demo.preference import make_preference_data

        pairs = make_preference_data(tmp_path / "pairs", seed=0, n_image=2, n_audio=2, n_text_repeat=1, n_eval_each=1)
        files = sorted(pairs.glob("train_*.jsonl"))
    if fmt == "text":  # a text-format copy of the demo's fact table
        rows = [json.loads(x) for x in files[0].read_text().splitlines()]
        text = tmp_path / "text.jsonl"
        text.write_text("".join(json.dumps({"text": " ".join(m["content"] for m in r["messages"]
                                                               if isinstance(m["content"], str))}) + "\n"
                                for r in rows))
        files = [text]
    raw = yaml.safe_load(path.read_text())
    raw["model"]["base"] = str(tiny_base)
    raw["datasets"] = [{"path": str(f), "format": fmt if fmt in ("text", "preference") else "messages"} for f in files]
    raw.pop("eval_datasets", None)
    raw["data"] |= {"max_seq_len": 512, "image_tokens": 70, "cache_dir": str(tmp_path / "cache")}
    raw["train"] |= {"output_dir": str(tmp_path / "run"), "max_steps": 1, "grad_accum": 1, "batch_size": 1,
                     "eval_every": 0, "save_every": 0}
    raw["train"].pop("reference_adapter", None)  # an SFT run's adapter: the reference is the base here
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(raw))
    result = train(load_recipe(copy))
    assert result.steps == 1 and len(result.losses) == 1 and result.losses[0] == result.losses[0]


# ---------------------------------------------------------------- 8. messages and rejects


def test_rejects_keep_a_reference_and_a_size_not_the_media_bytes(tmp_path):
    from data_tools.accounting import Ledger

    ledger = Ledger("skip", tmp_path / "rejects.jsonl")
    image = {"bytes": b"\x89PNG" + b"\0" * 50_000, "path": "cat.png"}
    ledger.add({"rejected": "corrupt_media", "detail": "cannot decode", "origin": "hf[train]:row 3", "dataset": "0:hf",
                "record": {"images": [image], "audio": "data:audio/wav;base64," + "A" * 20_000, "q": "what?"}})
    line = (tmp_path / "rejects.jsonl").read_text()
    assert len(line) < 600
    row = json.loads(line)
    assert row["record"]["images"] == [{"bytes": "<50004 bytes>", "path": "cat.png"}]
    assert row["record"]["audio"].endswith("<20022 characters>") and row["record"]["q"] == "what?"
    assert row["origin"] == "hf[train]:row 3" and row["reason"] == "corrupt_media"


def test_plan_check_exits_non_zero_when_it_does_not_fit(capsys):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "gemma4-12b" / "image-qa.yaml"
    assert main(["plan", str(recipe), "--check"]) == 0
    assert main(["plan", str(recipe), "--check", "data.max_seq_len=65536"]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", str(recipe), "data.max_seq_len=65536"]) == 0  # without --check: a report


# ---------------------------------------------------------------- 9. help


def test_every_option_of_every_verb_is_described(capsys):
    import argparse

    from finetune.cli.main import build_parser

    missing = []

    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    walk(sp, [*path, name])
            elif not isinstance(a, argparse._HelpAction) and not (a.help or "").strip():
                missing.append(f"{' '.join(path)} {a.dest}")

    walk(build_parser(), [])
    assert missing == []
    with pytest.raises(SystemExit):
        main(["combine", "--help"])
    out = capsys.readouterr().out
    assert "method: cat" in out and "adapters:" in out and "density:" in out and "output:" in out


def test_an_empty_answer_is_named_plainly():
    from data_tools.conversation import BadRecord
    from data_tools.formats import parse_record

    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}
    with pytest.raises(BadRecord) as e:
        parse_record(record, "messages", "d.jsonl:3", ".")
    assert (e.value.reason, e.value.detail) == ("no_answer", "the assistant's answer (the last message) is empty")
    with pytest.raises(BadRecord) as e:
        parse_record({"messages": record["messages"][:1]}, "messages", "d.jsonl:4", ".")
    assert e.value.detail == "the last message is from 'user'; a sample ends with the assistant's answer"


def test_an_unreachable_hub_id_fails_at_once(tmp_path, capsys, monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]}) + "\n")
    recipe = _write_recipe(tmp_path, Path("nobody-here/no-such-model"), [{"path": "d.jsonl"}])
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["base"] = "nobody-here/no-such-model"  # a hub id, not a path
    recipe.write_text(yaml.safe_dump(raw))
    t0 = time.time()
    assert main(["validate", str(recipe)]) == 2
    assert time.time() - t0 < 10
    assert ("error: model.base: nobody-here/no-such-model is not in this machine's hub cache and the hub can't "
            "be reached.") in capsys.readouterr().err
