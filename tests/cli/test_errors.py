"""The error contract, verb by verb: bad input exits 2 with `error: <where>: <what>. <fix>` on
stderr and no traceback; a bug exits 1; nothing is lost; nothing unsafe is loaded.

The bad-input matrix runs the CLI in-process (`finetune.cli.main.main`); two subprocess runs prove
the same holds for the real executable.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from finetune.cli.main import main
from finetune.errors import RecipeErrors, UserError

ROOT = Path(__file__).resolve().parents[2]
MODULE = "model.language_model.layers.0.self_attn.q_proj"  # a 128 -> 128 linear of the tiny base
GOOD_RECORD = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}


@dataclass
class Run:
    rc: int
    out: str
    err: str


def cli(capsys, *argv) -> Run:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return Run(rc, out, err)


def assert_user_error(run: Run, where: str, what: str = "", *, prefix: bool = False) -> None:
    """Exit 2, a line `error: <where>: ...<what>...` ending in a fix, and no traceback.

    `prefix`: <where> may name a file inside `where` (an adapter folder's weights file).
    """
    assert "Traceback" not in run.err, run.err
    assert run.rc == 2, run.err
    lines = [line for line in run.err.splitlines() if line.startswith("error: ")]
    head = f"error: {where}" if prefix else f"error: {where}: "
    hit = [line for line in lines if line.startswith(head) and what in line]
    assert hit, f"no `error: {where}: ...{what}...` in:\n{run.err}"
    assert hit[0].endswith((".", "?")), hit[0]


# ---------------------------------------------------------------- shared files


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny base (weights + processor), good data, media files and adapters, written once."""
    from safetensors.torch import save_file

    from finetune.demo.tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("errors")
    base = write_tiny_model(root / "base")
    good = root / "good.jsonl"
    good.write_text(json.dumps(GOOD_RECORD) + "\n")

    media = root / "data"
    media.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(png, "PNG")
    (media / "red.png").write_bytes(png.getvalue())
    (media / "cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (media / "empty.png").write_bytes(b"")
    (media / "notes.wav").write_text("these are not audio samples\n")
    sf.write(media / "tone.wav", np.sin(np.arange(16_000) / 5).astype(np.float32), 16_000)

    def adapter(name: str, *, in_features: int = 128, kind: str = "safetensors") -> Path:
        folder = root / name
        folder.mkdir()
        config = {"peft_type": "LORA", "base_model_name_or_path": str(base), "r": 2, "lora_alpha": 4,
                  "target_modules": [MODULE], "lora_dropout": 0.0, "bias": "none", "task_type": None,
                  "inference_mode": True, "fan_in_fan_out": False}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        state = {f"base_model.model.{MODULE}.lora_A.weight": torch.randn(2, in_features),
                 f"base_model.model.{MODULE}.lora_B.weight": torch.randn(128, 2)}
        if kind == "pickle":
            torch.save(state, folder / "adapter_model.bin")
        else:
            save_file(state, folder / "adapter_model.safetensors")
        if kind == "corrupt":  # a copy cut short: the header promises more bytes than there are
            data = (folder / "adapter_model.safetensors").read_bytes()
            (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
        return folder

    adapters = {"pickle": adapter("pickle-only", kind="pickle"),
                "other-base": adapter("other-base", in_features=96),
                "corrupt": adapter("corrupt", kind="corrupt"),
                "missing": root / "no-such-adapter"}
    return types.SimpleNamespace(root=root, base=base, good=good, media=media, adapters=adapters)


def recipe_text(env, train=None, out=None, eval_set=True, **data) -> str:
    """A recipe over the tiny base; a good eval set keeps both splits non-empty whatever is rejected."""
    data = {"max_seq_len": 64, "cache_dir": env.root / "cache"} | data
    lines = [f"model:\n  base: {env.base}", f"datasets:\n  - path: {train or env.good}",
             f"eval_datasets:\n  - path: {env.good}" if eval_set else "", "data:"]
    lines += [f"  {k}: {v}" for k, v in data.items()]
    return "\n".join(lines) + f"\ntrain:\n  output_dir: {out or env.root / 'out'}\n"


# ---------------------------------------------------------------- recipes


def _dir_instead_of_file(tmp):
    (tmp / "r.yaml").mkdir()


def _pickle_base(tmp):
    (tmp / "pb").mkdir()
    (tmp / "pb" / "config.json").write_text("{}")
    (tmp / "pb" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")


# (id, recipe text | bytes | setup(tmp) | None for "no file", extra argv, where, what).
# `{base}`, `{good}`, `{tmp}` and `{path}` (the recipe file) are filled in per run.
HEAD = "model:\n  base: {base}\ndatasets:\n  - path: {good}\n"
RECIPE_CASES = [
    ("yaml-syntax", "model:\n  base: x\n datasets: [\n", [], "{path}:3", "YAML syntax error"),
    ("yaml-duplicate-key", HEAD + "lora:\n  r: 4\nlora:\n  r: 8\n", [], "{path}:7", "duplicate key 'lora'"),
    ("yaml-bad-tag-value", HEAD + "train:\n  seed: !!int many\n", [], "{path}:6", "bad !!int value"),
    ("unknown-key", HEAD + "lora:\n  alhpa: 8\n", [], "lora.alhpa", "unknown key. Did you mean lora.alpha?"),
    ("unknown-section", HEAD + "trainer:\n  lr: 1\n", [], "trainer", "Did you mean train?"),
    ("wrong-type", HEAD + "train:\n  lr: fast\n", [], "train.lr", "expected a number, got 'fast'"),
    ("wrong-type-section", "model: google/gemma\ndatasets:\n  - path: {good}\n", [], "model",
     "expected a mapping"),
    ("wrong-type-list", HEAD + "lora:\n  targets:\n    a: 1\n", [], "lora.targets", "expected a list"),
    ("out-of-range-low", HEAD + "lora:\n  r: 0\n", [], "lora.r", "below the minimum 1"),
    ("out-of-range-high", HEAD + "data:\n  eval_fraction: 1.5\n", [], "data.eval_fraction", "above the maximum"),
    ("not-finite", HEAD + "train:\n  lr: .nan\n", [], "train.lr", "not a finite number"),
    ("missing-section", "model:\n  base: {base}\n", [], "datasets", "is required"),
    ("missing-key", "model:\n  dtype: bf16\ndatasets:\n  - path: {good}\n", [], "model.base", "is required"),
    ("empty-datasets", "model:\n  base: {base}\ndatasets: []\n", [], "datasets", "is empty"),
    ("bad-enum", HEAD + "data:\n  on_bad_record: ignore\n", [], "data.on_bad_record", "not one of"),
    ("bad-enum-number", HEAD + "data:\n  image_tokens: 100\n", [], "data.image_tokens", "not one of 70"),
    ("bad-enum-typo", "model:\n  base: b\n  quantization: nf5\ndatasets:\n  - path: {good}\n", [],
     "model.quantization", "Did you mean 'nf4'?"),
    ("bad-regex-target", HEAD + "lora:\n  targets: ['q_proj(']\n", [], "lora.targets[0]", "not a valid regex"),
    ("empty-file", "", [], "{path}", "the recipe is empty"),
    ("only-comments", "# model:\n#   base: x\n", [], "{path}", "the recipe is empty"),
    ("binary-file", b"\x89PNG\r\n\x1a\n\x00\x00", [], "{path}", "binary file"),
    ("not-utf8", "model: caf\xe9\n".encode("latin-1"), [], "{path}", "not UTF-8"),
    ("directory", _dir_instead_of_file, [], "{path}", "is a directory"),
    ("missing-recipe", None, [], "{path}", "file not found"),
    ("top-level-list", "- model\n- datasets\n", [], "{path}", "must be a mapping"),
    ("python-tag", "model: !!python/object/apply:os.system ['touch {tmp}/ran']\n", [], "{path}:1",
     "YAML tag '!!python/object/apply:os.system' is not allowed"),
    ("override-bad-value", HEAD, ["lora.r=abc"], "lora.r", "expected an integer"),
    ("override-no-equals", HEAD, ["lora"], "lora", "must look like key.path=value"),
    ("override-bad-index", HEAD, ["datasets.4.path=x"], "datasets.4", "no such list item"),
    # without --no-data: the base and the sources are checked too
    ("missing-data-path", "model:\n  base: {base}\ndatasets:\n  - path: {tmp}/nope.jsonl\n", ["+data"],
     "datasets[0].path", "no such file or folder"),
    ("empty-data-file", HEAD, ["+data", "datasets.0.path={tmp}/r.yaml.jsonl", "+touch"],
     "datasets[0].path", "the file is empty"),
    ("data-folder-without-data", HEAD, ["+data", "datasets.0.path={tmp}"], "datasets[0].path", "holds no"),
    ("unsupported-data-type", HEAD, ["+data", "datasets.0.path={path}"], "datasets[0].path",
     "unsupported file type .yaml"),
    ("missing-base", HEAD, ["+data", "model.base={tmp}/no-base"], "model.base", "does not exist"),
    ("base-is-a-file", HEAD, ["+data", "model.base={good}"], "model.base", "is a file"),
    ("base-without-config", HEAD, ["+data", "model.base={tmp}"], "model.base", "no config.json"),
    ("pickle-only-base", _pickle_base, ["+data", "model.base={tmp}/pb"], "model.base", "pickle"),
    ("output-dir-is-a-file", HEAD, ["+data", "train.output_dir={good}/sub"], "train.output_dir", "is a file"),
]


@pytest.mark.parametrize("case", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe(env, tmp_path, capsys, case):
    name, content, extra, where, what = case
    path = tmp_path / "r.yaml"
    fill = {"base": env.base, "good": env.good, "tmp": tmp_path, "path": path}
    if callable(content):
        content(tmp_path)
        content = HEAD if not path.exists() else None
    if isinstance(content, str):
        path.write_text(content.format(**fill))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    if "+touch" in extra:
        (tmp_path / "r.yaml.jsonl").write_text("")
    argv = ["validate", path] + [a.format(**fill) for a in extra if not a.startswith("+")]
    if "+data" not in extra:
        argv.append("--no-data")
    assert_user_error(cli(capsys, *argv), where.format(**fill), what)
    assert not (tmp_path / "ran").exists()


def test_several_recipe_errors_are_reported_together(env, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(HEAD.format(base=env.base, good=env.good)
                                     + "lora:\n  r: 0\n  dropout: high\ntrain:\n  optimizer: adam\n")
    run = cli(capsys, "validate", tmp_path / "r.yaml", "--no-data")
    assert run.rc == 2 and "Traceback" not in run.err
    assert run.err.splitlines() == [
        "error: lora.r: 0 is below the minimum 1. Use a value >= 1.",
        "error: lora.dropout: expected a number, got 'high'.",
        "error: train.optimizer: 'adam' is not one of 'adamw' | 'adamw8bit' | 'paged_adamw' | "
        "'paged_adamw8bit'. Did you mean 'adamw'?"]


def test_validate_checks_base_and_every_source_at_once(env, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(f"model:\n  base: {tmp_path}/nobase\ndatasets:\n  - path: {env.good}\n"
                                     f"  - path: {tmp_path}/b.jsonl\neval_datasets:\n  - path: {tmp_path}/c\n")
    run = cli(capsys, "validate", tmp_path / "r.yaml")
    assert [line.split(":")[1] for line in run.err.splitlines()] == [
        " model.base", " datasets[1].path", " eval_datasets[0].path"]
    assert cli(capsys, "validate", tmp_path / "r.yaml", "--no-data").rc == 0


@pytest.mark.parametrize("verb", [["train"], ["plan"], ["data", "stats"], ["data", "preview", "--out", "x.html"],
                                  ["eval", "--adapter", "a"]], ids=lambda v: v[0] + (v[1] if v[0] == "data" else ""))
def test_every_recipe_verb_reports_a_bad_recipe(tmp_path, capsys, verb):
    (tmp_path / "r.yaml").write_text("model:\n  base: b\ndatasets:\n  - path: a.jsonl\nlora:\n  r: many\n")
    argv = verb[:2] + [tmp_path / "r.yaml"] + verb[2:] if verb[0] == "data" else verb[:1] + [tmp_path / "r.yaml"] + verb[1:]
    assert_user_error(cli(capsys, *argv), "lora.r", "expected an integer")
    assert list(tmp_path.iterdir()) == [tmp_path / "r.yaml"]  # nothing ran, nothing written


# ---------------------------------------------------------------- data: every bad-record kind


def _msg(*content, answer="ok") -> dict:
    return {"messages": [{"role": "user", "content": list(content)}, {"role": "assistant", "content": answer}]}


def _img(ref: str) -> dict:
    return {"type": "image", "path": ref}


# (id, line 2 of the data file (a dict, or raw text), reason, data: settings)
DATA_CASES = [
    ("unparseable-line", '{"messages": [', "unparseable", {}),
    ("not-an-object", "[1, 2]", "wrong_shape", {}),
    ("no-messages-list", {"conversation": []}, "wrong_shape", {}),
    ("bad-role", {"messages": [{"role": "robot", "content": "x"}]}, "wrong_shape", {}),
    ("missing-media", _msg(_img("nope.png")), "missing_media", {}),
    ("corrupt-media", _msg(_img("cut.png")), "corrupt_media", {}),
    ("empty-media", _msg(_img("empty.png")), "corrupt_media", {}),
    ("not-media", _msg({"type": "audio", "path": "notes.wav"}), "corrupt_media", {}),
    ("unknown-part", _msg({"type": "video", "path": "a.mp4"}), "unknown_part", {}),
    ("no-user-turn", {"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "assistant", "content": "ok"}]}, "no_user_turn", {}),
    ("empty-answer", _msg({"type": "text", "text": "hi"}, answer=""), "no_answer", {}),
    ("missing-answer", {"messages": [{"role": "user", "content": "hi"}]}, "no_answer", {}),
    ("placeholder-mismatch", _msg({"type": "image"}), "placeholder_mismatch", {}),
    ("over-budget-drop", _msg({"type": "text", "text": "tell me more " * 60}), "over_budget",
     {"overflow": "drop"}),
    ("network-media-off", _msg(_img("http://127.0.0.1:9/x.png")), "network_media", {}),
    ("image-pixel-cap", _msg(_img("red.png")), "media_too_large", {"max_image_pixels": 16}),
    ("media-byte-cap", _msg(_img("red.png")), "media_too_large", {"max_media_bytes": 10}),
    ("audio-duration-cap", _msg({"type": "audio", "path": "tone.wav"}), "media_too_large",
     {"max_audio_seconds": 0.1, "audio_overflow": "reject"}),
]


def _data_run(env, tmp_path, capsys, bad, mode, settings) -> tuple[Run, Path]:
    data = env.media / f"{tmp_path.name}.jsonl"  # next to the media files it names
    data.write_text(json.dumps(GOOD_RECORD) + "\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
    (tmp_path / "r.yaml").write_text(recipe_text(env, data, tmp_path / "out", on_bad_record=mode, **settings))
    return cli(capsys, "data", "stats", tmp_path / "r.yaml", "--json"), data


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_record_under_error_stops_naming_file_and_line(env, tmp_path, capsys, case):
    _, bad, reason, settings = case
    run, data = _data_run(env, tmp_path, capsys, bad, "error", settings)
    assert_user_error(run, f"{data}:2", f"bad record ({reason})")
    assert "on_bad_record: skip" in run.err


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_record_under_skip_is_counted_and_kept(env, tmp_path, capsys, case):
    _, bad, reason, settings = case
    run, data = _data_run(env, tmp_path, capsys, bad, "skip", settings)
    assert run.rc == 0, run.err
    stats = json.loads(run.out)
    assert (stats["records"], stats["used"], stats["rejected"]) == (2, 1, 1)
    assert stats["records"] == stats["used"] + stats["rejected"]
    assert stats["rejected_by_reason"] == {reason: 1}
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["origin"], r["reason"]) for r in rejects] == [(f"{data}:2", reason)]
    assert rejects[0]["detail"]
    if isinstance(bad, dict) or reason == "unparseable":
        assert rejects[0]["record"] == bad  # written back as read, so it can be fixed and re-fed


def test_cap_messages_name_the_setting(env, tmp_path, capsys):
    details = {}
    for name, bad, _, settings in DATA_CASES:
        if name in ("network-media-off", "image-pixel-cap", "audio-duration-cap"):
            sub = tmp_path / name
            sub.mkdir()
            run, _ = _data_run(env, sub, capsys, bad, "error", settings)
            details[name] = run.err
    assert "data.allow_network_media is false" in details["network-media-off"]
    assert "max_image_pixels=16" in details["image-pixel-cap"]
    assert "max_audio_seconds=0.1" in details["audio-duration-cap"]


@pytest.mark.parametrize("variant", [
    pytest.param({"eval_set": False}, id="no-eval-set"),
    pytest.param({"streaming": True}, id="streaming"),
])
def test_data_stats_on_valid_data_sections(env, tmp_path, capsys, variant):
    (tmp_path / "r.yaml").write_text(recipe_text(env, out=tmp_path / "out", cache_dir=tmp_path / "c", **variant))
    run = cli(capsys, "data", "stats", tmp_path / "r.yaml", "--json")
    assert run.rc == 0, run.err
    assert json.loads(run.out)["records"] == 1


# ---------------------------------------------------------------- artifacts


ARTIFACT_CASES = [(verb, kind, what) for verb in ("export", "merge") for kind, what in [
    ("missing", "not found"), ("pickle", "pickle"), ("other-base", "another base"), ("corrupt", "safetensors")]]


@pytest.mark.parametrize("verb,kind,what", ARTIFACT_CASES, ids=[f"{v}-{k}" for v, k, _ in ARTIFACT_CASES])
def test_bad_adapter_for_export_and_merge(env, tmp_path, capsys, verb, kind, what):
    adapter = env.adapters[kind]
    argv = ["export", "--format", "vllm"] if verb == "export" else ["merge"]
    run = cli(capsys, *argv, adapter, tmp_path / "out")
    assert_user_error(run, str(adapter), what, prefix=True)


@pytest.mark.parametrize("kind,what", [
    ("missing", "not found"), ("pickle", "pickle"), ("other-base", "another base"),
    ("corrupt", "safetensors")])
def test_bad_adapter_for_generate(env, capsys, kind, what):
    adapter = env.adapters[kind]
    run = cli(capsys, "generate", "--adapter", adapter, "--max-new-tokens", 1, "hi")
    assert_user_error(run, str(adapter), what, prefix=True)


@pytest.mark.parametrize("spec,where,what", [
    (None, "{spec}", "file not found"),
    ("method: average\nadapters:\n  - path: a\noutput: o\n", "{spec}: method", "not one of"),
    ("method: linear\nadapters:\n  - path: nope\n    weight: 1\noutput: o\n", "{tmp}/nope", "not found"),
], ids=["missing-spec", "bad-method", "missing-adapter"])
def test_bad_combine_spec(tmp_path, capsys, spec, where, what):
    path = tmp_path / "spec.yaml"
    if spec:
        path.write_text(spec)
    assert_user_error(cli(capsys, "combine", path), where.format(spec=path, tmp=tmp_path), what)


def test_bad_adapter_for_eval(env, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(recipe_text(env))
    adapter = env.adapters["missing"]
    assert_user_error(cli(capsys, "eval", tmp_path / "r.yaml", "--adapter", adapter), str(adapter),
                      "not found")


def test_pickle_adapter_is_refused_by_the_loader(env):
    from finetune.model.adapters import load_adapter

    with pytest.raises(UserError) as e:
        load_adapter(torch.nn.Linear(1, 1), str(env.adapters["pickle"]))
    # The place named is the pickle file inside the adapter folder.
    assert e.value.where.startswith(str(env.adapters["pickle"])) and "--allow-pickle" in e.value.fix


# ---------------------------------------------------------------- exit codes and --debug


def test_internal_bug_exits_1_with_a_traceback(monkeypatch, capsys):
    def broken(args):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr("finetune.cli.main.cmd_validate", broken)
    run = cli(capsys, "validate", "x.yaml")
    assert run.rc == 1 and "Traceback" in run.err and "internal error: ZeroDivisionError" in run.err


def test_debug_shows_the_traceback_wherever_it_is_given(tmp_path):
    for argv in (["--debug", "validate", tmp_path / "nope.yaml"], ["validate", tmp_path / "nope.yaml", "--debug"]):
        with pytest.raises(UserError, match="file not found"):
            main([str(a) for a in argv])


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["validate"], ["frobnicate"], ["export", "--format", "zip", "a", "b"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_os_errors_on_user_paths_exit_2(env, tmp_path, capsys):
    # validate would catch this; data stats goes straight to writing rejects.jsonl
    (tmp_path / "r.yaml").write_text(recipe_text(env, out=f"{env.good}/out"))
    assert_user_error(cli(capsys, "data", "stats", tmp_path / "r.yaml"), f"{env.good}/out", "Not a directory")


def test_real_processes_exit_2_without_traceback_and_run_nothing(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "tag.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n"
                                       "datasets:\n  - path: a.jsonl\n")
    (tmp_path / "two.yaml").write_text("model:\n  base: b\n  dtype: bf17\ndatasets:\n  - path: a\n    weight: x\n")
    for name, lines in [("tag.yaml", 1), ("two.yaml", 2)]:
        p = subprocess.run([sys.executable, "-m", "finetune.cli", "validate", str(tmp_path / name)],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.splitlines()) == lines and p.stderr.startswith("error: ")
    assert not marker.exists()


# ---------------------------------------------------------------- nothing lost


def test_stats_check_catches_a_lost_record():
    from data_tools.accounting import Stats

    Stats(records=3, used=2, rejected=1).check()
    with pytest.raises(AssertionError, match="accounting broken"):
        Stats(records=3, used=1, rejected=1).check()


def test_a_run_that_loses_a_record_fails_loudly(env, tmp_path, capsys, monkeypatch):
    from data_tools.accounting import Stats

    monkeypatch.setattr(Stats, "add_reject", lambda self, reason: None)  # a reject that is not counted
    run, _ = _data_run(env, tmp_path, capsys, "not json", "skip", {})
    assert run.rc == 1 and "accounting broken: 2 records != 1 used + 0 rejected" in run.err


# ---------------------------------------------------------------- safety


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['touch {m}']",
                                 "!!python/object/new:subprocess.Popen [['touch', '{m}']]",
                                 "!!python/name:os.system", "!!python/module:os"])
def test_python_tags_are_errors_and_nothing_runs(tmp_path, tag):
    from finetune.config.recipe import load_recipe

    marker = tmp_path / "ran"
    (tmp_path / "r.yaml").write_text(f"model:\n  base: {tag.format(m=marker)}\ndatasets: []\n")
    with pytest.raises(UserError, match="is not allowed"):
        load_recipe(tmp_path / "r.yaml")
    assert not marker.exists()


def test_pickle_base_is_refused_unless_allowed(env, tmp_path, capsys):
    _pickle_base(tmp_path)
    (tmp_path / "r.yaml").write_text(HEAD.format(base=tmp_path / "pb", good=env.good))
    assert_user_error(cli(capsys, "validate", tmp_path / "r.yaml"), "model.base", "model.allow_pickle: true")
    assert cli(capsys, "validate", tmp_path / "r.yaml", "model.allow_pickle=true").rc == 0


def test_load_paths_pass_trust_remote_code_and_safetensors_only(env, monkeypatch):
    import transformers

    from finetune.model import load as fm

    seen = {}

    def spy(name, result):
        def from_pretrained(path, **kw):
            seen[name] = kw
            return result
        return classmethod(lambda cls, path, **kw: from_pretrained(path, **kw))

    stub = torch.nn.Linear(1, 1)
    stub.config = types.SimpleNamespace(model_type="gemma4_unified", use_cache=True)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", spy("model", stub))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy("config", stub.config))
    proc = types.SimpleNamespace(image_processor=types.SimpleNamespace())
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", spy("processor", proc))

    fm.load_base(str(env.base), quantization="none")
    fm.base_family(str(env.base))
    fm.load_processor(str(env.base))
    assert seen["model"]["use_safetensors"] is True
    assert {k: v["trust_remote_code"] for k, v in seen.items()} == {"model": False, "config": False,
                                                                    "processor": False}
    fm.load_base(str(env.base), quantization="none", trust_remote_code=True, allow_pickle=True)
    fm.base_family(str(env.base), trust_remote_code=True)
    fm.load_processor(str(env.base), trust_remote_code=True)
    assert seen["model"]["use_safetensors"] is None  # .bin allowed, safetensors still preferred
    assert all(v["trust_remote_code"] is True for v in seen.values())


def test_train_passes_the_recipe_safety_switches_through(env, tmp_path, monkeypatch):
    import data_tools.pipeline
    from finetune.config.recipe import recipe_from_dict
    from finetune.model import load as fm
    from finetune.training.loop import train

    calls = {}

    class Stop(Exception):
        pass

    def record(name, result=None):
        def fn(*args, **kw):
            calls[name] = (args, kw)
            if result is Stop:
                raise Stop
            return result
        return fn

    monkeypatch.setattr(fm, "base_family", record("family", types.SimpleNamespace(chat=None)))
    monkeypatch.setattr(fm, "load_processor", record("processor"))
    monkeypatch.setattr(data_tools.pipeline, "prepare", record("prepare", types.SimpleNamespace(
        stats={}, streaming=True)))
    monkeypatch.setattr(fm, "load_base", record("base", Stop))
    recipe = recipe_from_dict({"model": {"base": str(env.base), "trust_remote_code": True, "allow_pickle": True},
                               "datasets": [{"path": str(env.good)}], "train": {"output_dir": str(tmp_path)}})
    with pytest.raises(Stop):
        train(recipe, log=lambda *a: None)
    assert calls["family"][0] == (str(env.base), True)
    assert calls["processor"][0][2] is True
    assert calls["base"][1]["trust_remote_code"] is True and calls["base"][1]["allow_pickle"] is True


def test_recipe_errors_group_flattens_nested_groups():
    inner = RecipeErrors([UserError("a", "x"), UserError("b", "y")])
    outer = RecipeErrors([inner, UserError("c", "z", "Do it")])
    assert outer.lines() == ["a: x.", "b: y.", "c: z. Do it."]
    assert UserError("k", "line one\nline two.", "Did you mean k2?").line() == "k: line one line two. Did you mean k2?"
