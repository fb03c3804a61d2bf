"""The repository explains itself: the module map can't drift, every module says its job, none is too long."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import module_map  # noqa: E402

MAX_LINES = 400


def test_module_map_is_generated_from_the_code():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    assert module_map.render(text) == text, "run `python scripts/module_map.py`"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "module_map.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout


def test_the_map_fails_when_a_module_has_no_line(tmp_path, monkeypatch):
    text = (ROOT / "ARCHITECTURE.md").read_text()
    extra = ROOT / "finetune" / "_map_probe.py"
    extra.write_text('"""A probe module the map does not list yet."""\n')
    try:
        assert module_map.render(text) != text
        assert "| `finetune/_map_probe.py` | A probe module the map does not list yet. |" in module_map.render(text)
    finally:
        extra.unlink()


def test_every_module_says_its_job_and_stays_short():
    too_long = {}
    for p in module_map.modules():
        assert module_map.job(p), f"{p} has no docstring"
        n = len((ROOT / p).read_text().splitlines())
        if n > MAX_LINES:
            too_long[str(p)] = n
    assert too_long == {}
