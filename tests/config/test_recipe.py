"""Recipes: every shipped one validates; bad ones fail with the key path, all errors at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune.cli.main import main
from finetune.config.recipe import (
    ModelSection,
    Recipe,
    dump_recipe,
    load_recipe,
    read_yaml,
    recipe_from_dict,
)
from finetune.config.schema import resolve_paths
from finetune.config.yaml_io import SafeYamlLoader
from finetune.errors import RecipeErrors, UserError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (ROOT / "recipes").rglob("*.y*ml")
                 if isinstance(yaml.safe_load(p.read_text()), dict) and "model" in yaml.safe_load(p.read_text()))


def minimal(**sections) -> dict:
    raw = {"model": {"base": "some/base"}, "datasets": [{"path": "train.jsonl"}]}
    for name, value in sections.items():
        raw[name] = value
    return raw


def errors_of(raw) -> list[str]:
    with pytest.raises(UserError) as e:
        recipe_from_dict(raw)
    return e.value.lines()


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------- shipped recipes


def test_there_are_shipped_recipes():
    assert ROOT / "recipes" / "demo.yaml" in SHIPPED and len(SHIPPED) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_shipped_recipe_loads_and_validates(path, capsys):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.datasets
    # The demo's data and base are generated at run time, so only the recipe itself is checked.
    assert main(["validate", str(path), "--no-data"]) == 0
    assert capsys.readouterr().out.startswith("ok:")


def test_shipped_files_name_no_path_of_the_machine_that_made_them():
    """Recipes and bundled configs travel: an absolute path of a build machine in them (a
    `_source` naming a file in someone's workspace) means nothing, or something else, elsewhere."""
    import re

    machine = re.compile(r"(?<![\w.])/(?:work|home|Users|root|tmp|mnt|private)/")
    shipped = [*SHIPPED, *sorted((ROOT / "finetune").rglob("configs/*.json"))]
    assert len(shipped) > len(SHIPPED)
    found = {str(p.relative_to(ROOT)): m.group(0) for p in shipped if (m := machine.search(p.read_text()))}
    assert found == {}


# ---------------------------------------------------------------- good recipes


def test_minimal_recipe_gets_the_documented_defaults():
    r = recipe_from_dict(minimal(), "x.yaml")
    assert r.source == "x.yaml"
    assert r.model.quantization == "nf4" and r.model.trust_remote_code is False
    assert r.model.allow_pickle is False and r.data.allow_network_media is False
    assert r.data.on_bad_record == "error" and r.lora.targets == ["attention", "mlp"]
    assert ModelSection.__dataclass_fields__["trust_remote_code"].default is False


def test_friendly_coercions():
    r = recipe_from_dict(minimal(lora={"targets": "attention", "alpha": 16},
                                 train={"max_steps": 10.0, "output_dir": 2024}))
    assert r.lora.targets == ["attention"] and r.lora.alpha == 16.0 and isinstance(r.lora.alpha, float)
    assert r.train.max_steps == 10 and r.train.output_dir == "2024"


def test_dates_stay_text_and_yaml_extras_load(tmp_path):
    p = write(tmp_path, "model: {base: some/base}\ndatasets:\n  - &d {path: a.jsonl}\n  - *d\n"
              "train:\n  output_dir: runs/2024-01-01\n  seed: 2024-13-45\n")
    with pytest.raises(UserError) as e:  # an impossible date is a type error, not a crash
        load_recipe(p)
    assert e.value.lines() == ["train.seed: expected an integer, got '2024-13-45'."]
    r = load_recipe(p, ["train.seed=3"])
    assert r.train.output_dir == str(tmp_path / "runs/2024-01-01") and len(r.datasets) == 2


def test_dump_and_load_round_trip(tmp_path):
    r = recipe_from_dict(minimal(lora={"r": 4, "targets": ["attention", r"q_proj$"]}))
    dump_recipe(r, tmp_path / "lock.yaml")
    expected = r.to_dict()  # read back from a file, relative paths resolve against its folder
    resolve_paths(Recipe, expected, tmp_path)
    assert load_recipe(tmp_path / "lock.yaml").to_dict() == expected
    locked = load_recipe(tmp_path / "lock.yaml")  # a loaded recipe's paths are absolute: stable
    dump_recipe(locked, tmp_path / "again.yaml")
    assert load_recipe(tmp_path / "again.yaml").to_dict() == locked.to_dict()


# ---------------------------------------------------------------- bad recipes


@pytest.mark.parametrize("sections,where,what", [
    ({"lora": {"r": 0}}, "lora.r", "0 is below the minimum 1"),
    ({"lora": {"dropout": 0.95}}, "lora.dropout", "above the maximum 0.9"),
    ({"lora": {"alpha": float("nan")}}, "lora.alpha", "not a finite number"),
    ({"train": {"lr": "fast"}}, "train.lr", "expected a number, got 'fast'"),
    ({"train": {"max_steps": 2.5}}, "train.max_steps", "expected an integer"),
    ({"train": {"packing": "yes"}}, "train.packing", "expected true or false"),
    ({"train": {"report_to": ["mlflow"]}}, "train.report_to[0]", "not a known tracker"),
    ({"model": {"base": "b", "quantization": "nf5"}}, "model.quantization", "Did you mean 'nf4'?"),
    ({"model": {"quantization": "nf4"}}, "model.base", "is required"),
    ({"model": "google/gemma"}, "model", "expected a mapping, got str"),
    ({"data": {"image_tokens": 100}}, "data.image_tokens", "not one of 70 | 140 | 280 | 560 | 1120"),
    ({"data": {"image_tokens": 280.0}}, "data.image_tokens", "not one of"),
    ({"datasets": []}, "datasets", "is empty"),
    ({"datasets": {"path": "a"}}, "datasets", "expected a list, got dict"),
    ({"datasets": [{"path": "a", "weight": 0}]}, "datasets", "all weights are zero"),
    ({"datasets": [{"path": "a", "columns": {"messages": ["x"]}}]}, "datasets[0].columns.messages",
     "expected a name"),
    ({"datasets": [{"format": "chatml"}]}, "datasets[0].path", "is required"),
    ({"lora": {"targets": ["(unclosed"]}}, "lora.targets[0]", "not a valid regex"),
    ({"lora": {"targets": ["(" * 2000 + ")" * 2000]}}, "lora.targets[0]", "not a valid regex"),
    ({"lora": {"targets": [" "]}}, "lora.targets[0]", "an empty target"),
    ({"train": {"packing": True}, "data": {"streaming": True}}, "train.packing", "needs the cached dataset"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_recipe_names_the_key(sections, where, what):
    lines = errors_of(minimal(**sections))
    assert any(line.startswith(f"{where}: ") and what in line for line in lines), lines


def test_unknown_keys_suggest_the_closest_one():
    lines = errors_of(minimal(lora={"alhpa": 8}, trian={}, model={"base": "b", "quantisation": "nf4"}))
    assert "lora.alhpa: unknown key. Did you mean lora.alpha?" in lines
    assert "trian: unknown key. Did you mean train?" in lines
    assert "model.quantisation: unknown key. Did you mean model.quantization?" in lines
    far = errors_of(minimal(lora={"zzz": 1}))
    assert far[0].startswith("lora.zzz: unknown key. Known keys: r, alpha, dropout")


def test_several_errors_are_reported_together():
    with pytest.raises(RecipeErrors) as e:
        recipe_from_dict({"model": {"quantization": "nf5"}, "lora": {"r": -1, "dropout": "x"},
                          "train": {"optimizer": "adam", "lr": 5}})
    wheres = [err.where for err in e.value.errors]
    assert wheres == ["model.base", "model.quantization", "datasets", "lora.r", "lora.dropout",
                      "train.lr", "train.optimizer"]
    assert len(e.value.lines()) == len(wheres)


def test_messages_stay_short_for_huge_values():
    bomb: list = ["x" * 10_000]
    for _ in range(30):  # what YAML aliases make of a few lines: 2**30 leaves, shared
        bomb = [bomb, bomb]
    lines = errors_of(minimal(lora={"targets": [bomb]}, train={"output_dir": {"k" * 5000: 1}}))
    assert all(len(line) < 400 for line in lines), lines


@pytest.mark.parametrize("text,where,what", [
    ("model:\n  base: x\n datasets: [\n", ":3", "YAML syntax error"),
    ("model: {base: a}\nmodel: {base: b}\n", ":2", "duplicate key 'model'"),
    ("model: {base: a}\ndatasets: [{path: a, weight: !!float x}]\n", ":2", "bad !!float value 'x'"),
    ("model: !!python/object/apply:os.getcwd []\n", ":1", "YAML tag '!!python/object/apply:os.getcwd'"),
    ("? [a, b]\n: 1\n", ":1", "unhashable key"),
    ("[" * 700 + "]" * 700, "", "nested too deeply"),
    ("- model\n- datasets\n", "", "the recipe must be a mapping, got list"),
    ("", "", "the recipe is empty"),
    ("{}\n", "", "the recipe is empty"),
], ids=["syntax", "duplicate", "bad-tag-value", "python-tag", "unhashable", "deep", "list", "empty", "empty-map"])
def test_bad_yaml_files(tmp_path, text, where, what):
    p = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_recipe(p)
    assert e.value.where == f"{p}{where}" and what in e.value.what, e.value.line()


def test_the_loader_is_a_safe_loader():
    assert issubclass(SafeYamlLoader, yaml.SafeLoader)
    assert not issubclass(SafeYamlLoader, (yaml.FullLoader, yaml.UnsafeLoader))


def test_read_yaml_refuses_non_text(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"model:\x00\x01")
    (tmp_path / "latin.yaml").write_bytes("model: caf\xe9".encode("latin-1"))
    for name, what in [("bin.yaml", "binary"), ("latin.yaml", "not UTF-8"), ("nope.yaml", "not found"),
                       ("", "is a directory")]:
        with pytest.raises(UserError) as e:
            read_yaml(tmp_path / name)
        assert what in e.value.what and e.value.where == str(tmp_path / name)


# ---------------------------------------------------------------- overrides


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    return write(tmp_path, "model:\n  base: some/base\ndatasets:\n  - path: a.jsonl\n  - path: b.jsonl\n"
                 "eval:\n")


def test_overrides_set_scalars_lists_and_list_items(recipe_file):
    r = load_recipe(recipe_file, ["lora.r=8", "train.lr=1e-4", "train.packing=true",
                                  "lora.targets=[attention, 'q_proj$']", "datasets.1.weight=3",
                                  "datasets.0.format=sharegpt", "eval.metric=token_f1",
                                  "model.base=other/base=v2", "train.output_dir="])
    assert (r.lora.r, r.train.lr, r.train.packing) == (8, 1e-4, True)
    assert r.lora.targets == ["attention", "q_proj$"]
    assert (r.datasets[1].weight, r.datasets[0].format) == (3.0, "sharegpt")
    # paths typed on the command line resolve against the current folder ("" stays unset)
    assert r.eval.metric == "token_f1" and r.model.base == str(Path.cwd() / "other/base=v2")
    assert r.train.output_dir == ""


def test_override_appends_a_list_item_at_its_end(recipe_file):
    r = load_recipe(recipe_file, ["eval_datasets.0.path=held.jsonl", "datasets.2.path=c.jsonl"])
    # written in the file: against its folder; typed as an override: against the current one
    here, there = recipe_file.parent, Path.cwd()
    assert [d.path for d in r.eval_datasets] == [str(there / "held.jsonl")]
    assert [d.path for d in r.datasets] == [str(here / "a.jsonl"), str(here / "b.jsonl"), str(there / "c.jsonl")]


def test_override_values_are_data_not_code(recipe_file, tmp_path):
    marker = tmp_path / "ran"
    r = load_recipe(recipe_file, [f"model.base=!!python/object/apply:os.system ['touch {marker}']"])
    assert "!!python/object/apply:os.system" in r.model.base and not marker.exists()


@pytest.mark.parametrize("override,where,what", [
    ("lora.r=abc", "lora.r", "expected an integer, got 'abc'"),
    ("lora.alpah=4", "lora.alpah", "Did you mean lora.alpha?"),
    ("datasets.5.path=x", "datasets.5", "no such list item"),
    ("datasets.first.path=x", "datasets.first", "no such list item"),
    ("model.base.name=x", "model.base", "not a section"),
    ("lora.r", "lora.r", "must look like key.path=value"),
    ("=3", "=3", "names no key"),
    ("datasets.0=plain.jsonl", "datasets[0]", "expected a mapping"),
    ("datasets.0.path.x=1", "datasets.0.path", "not a section"),
])
def test_bad_overrides_name_the_key(recipe_file, override, where, what):
    with pytest.raises(UserError) as e:
        load_recipe(recipe_file, [override])
    assert any(line.startswith(f"{where}: ") and what in line for line in e.value.lines()), e.value.lines()


def test_validate_exit_codes(recipe_file, capsys):
    assert main(["validate", str(recipe_file), "--no-data"]) == 0
    assert main(["validate", str(recipe_file), "lora.r=0", "train.lr=-1", "--no-data"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: lora.r: 0 is below the minimum 1. Use a value >= 1.",
                   "error: train.lr: -1.0 is below the minimum 0.0. Use a value >= 0.0."]


@pytest.mark.parametrize("written, read", [("off", "off"), ("on", "on"), ("false", "off"), ("true", "on"),
                                           ("no", "off"), ("yes", "on"), ("auto", "auto")])
def test_data_thinking_accepts_yaml_booleans(tmp_path, written, read):
    """YAML 1.1 reads `thinking: off` as false: a boolean means on/off; other values still fail."""
    path = write(tmp_path, f"model: {{base: b}}\ndatasets: [{{path: d.jsonl}}]\ndata: {{thinking: {written}}}\n")
    assert load_recipe(path).data.thinking == read
    assert load_recipe(path, [f"data.thinking={written}"]).data.thinking == read
    assert errors_of(minimal(data={"thinking": 1})) == ["data.thinking: 1 is not one of 'auto' | 'on' | 'off'. "
                                                        "Use one of 'auto' | 'on' | 'off'."]
