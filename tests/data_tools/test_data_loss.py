"""Nothing silent about data (issue 24): a run that would lose a dataset, more than
`data.max_rejected_fraction` of one, or anything to a cut-off media file stops with exit 2 and
names the dataset, the count and the reasons, the same way in `train`, `data stats` and
`validate`; what decoding changed on purpose (audio cut, resampled) is counted per dataset."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
import yaml
from PIL import Image

from data_tools.accounting import check_yield
from finetune.cli.main import main
from finetune.errors import UserError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def ask(question, answer, **media):
    content = [{"type": kind, "path": path} for kind, path in media.items()] + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def tone(path, seconds, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)


@pytest.fixture
def files(tmp_path):
    """An image dataset (4 pictures), a text dataset (4 records) and an audio dataset (3 clips)."""
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 200, 0)).save(tmp_path / f"p{i}.png")
    images = write_jsonl(tmp_path / "images.jsonl", [ask("Colour?", f"green {i}", image=f"p{i}.png")
                                                     for i in range(4)])
    text = write_jsonl(tmp_path / "text.jsonl", [ask(f"Capital {i}?", f"City {i}") for i in range(4)])
    for i in range(3):
        tone(tmp_path / f"a{i}.wav", 0.5)
    audio = write_jsonl(tmp_path / "audio.jsonl", [ask("Pitch?", f"440 Hz {i}", audio=f"a{i}.wav") for i in range(3)])
    return tmp_path, images, text, audio


def recipe_file(tmp_path, datasets, *, base, **data) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"base": str(base)},
        "datasets": [{"path": str(d)} for d in datasets],
        "data": {"image_tokens": 70, "cache_dir": str(tmp_path / "cache"), "on_bad_record": "skip", **data},
        "lora": {"r": 4, "targets": ["attention"]},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "batch_size": 1, "seed": 0}}))
    return str(path)


def error_line(capsys) -> str:
    """The one error line on stderr (train's progress bars go there too)."""
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_a_dataset_that_yields_nothing_stops_train_and_data_stats(files, tiny_base, capsys):
    """max_seq_len 64 is below one image's tokens: every image record is over budget. `train`
    used to write an adapter from the text alone and exit 0."""
    tmp, images, text, _ = files
    path = recipe_file(tmp, [text, images], base=tiny_base, max_seq_len=64)
    assert main(["train", path]) == 2
    line = error_line(capsys)
    assert line.startswith("error: datasets: 1:images.jsonl yielded no usable sample: all 4 records rejected")
    assert "over_budget" in line and "0:text.jsonl" not in line.split(". ")[0]
    assert "Check" not in line and "format" not in line  # not a format problem: no format hint
    assert not (tmp / "out" / "adapter").exists() and not (tmp / "out" / "checkpoints").exists()
    # data stats prints its counts, then fails on the same rule with the same message.
    assert main(["data", "stats", path, "--json"]) == 2
    captured = capsys.readouterr()
    stats = json.loads(captured.out)
    assert stats["datasets"]["1:images.jsonl"]["used"] == 0
    assert [x for x in captured.err.splitlines() if x.startswith("error:")] == [line]


def test_over_max_rejected_fraction_stops_unless_raised(files, tiny_base, processor, capsys):
    tmp, _, text, _ = files
    bad = write_jsonl(tmp / "half.jsonl", [ask("Q1?", "A1"), ask("Q2?", "A2"), "{not json", "[1]",
                                           {"messages": [{"role": "assistant", "content": "x"}]}])
    path = recipe_file(tmp, [text, bad], base=tiny_base, max_seq_len=256)
    assert main(["data", "stats", path]) == 2
    line = error_line(capsys)
    assert "1:half.jsonl lost 3 of 5 records, over data.max_rejected_fraction=0.5" in line
    assert "unparseable" in line and "no_user_turn" in line
    assert "format" in line and "raise data.max_rejected_fraction" in line  # format problems: the hint
    assert main(["data", "stats", path, "data.max_rejected_fraction=0.6"]) == 0


def test_one_cut_off_media_file_stops_the_run(files, tiny_base, capsys):
    """A WAV cut short decodes to less than its header states: never a shorter clip silently
    paired with the whole transcript, and never within the rejected-fraction allowance."""
    tmp, _, text, audio = files
    buf = io.BytesIO()
    sf.write(buf, np.full(14400, 0.25, np.float32), 16000, format="WAV")  # 0.9 s
    whole = buf.getvalue()
    (tmp / "a1.wav").write_bytes(whole[: len(whole) * 3 // 10])
    path = recipe_file(tmp, [text, audio], base=tiny_base, max_seq_len=512)
    assert main(["data", "stats", path]) == 2
    line = error_line(capsys)
    assert "1:audio.jsonl: 1 record(s) name a media file that is cut off {'truncated_media': 1}" in line
    assert "replace the cut-off media files" in line


def test_cutting_and_resampling_are_counted_per_dataset(files, tiny_base, capsys):
    tmp, _, text, audio = files
    for i in range(3):
        tone(tmp / f"a{i}.wav", 3.0 if i else 1.0, rate=44100)
    path = recipe_file(tmp, [text, audio], base=tiny_base, max_seq_len=512, max_audio_seconds=2.0)
    assert main(["data", "stats", path, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["datasets"]["1:audio.jsonl"]["overflow_actions"] == {"resample_audio": 3, "cut_audio": 2}
    assert stats["datasets"]["0:text.jsonl"]["overflow_actions"] == {}
    assert main(["data", "stats", path]) == 0
    out = capsys.readouterr().out
    assert "overflow actions: " in out and "cut_audio 2" in out and "resample_audio 3" in out


def test_validate_decodes_the_media_of_its_sample(files, tiny_base, capsys):
    """`validate` said ok with every image missing; `train` then stopped at record 1."""
    tmp, images, text, _ = files
    for i in range(4):
        (tmp / f"p{i}.png").unlink()
    (tmp / "p0.png").write_text("not a picture")
    path = recipe_file(tmp, [text, images], base=tiny_base, max_seq_len=256, on_bad_record="error")
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert f"{images}:1: bad record (corrupt_media): cannot decode image {tmp / 'p0.png'}" in err
    assert f"{images}:2: bad record (missing_media): image file {tmp / 'p1.png'} does not exist" in err
    # Skipping bad records, the sample is judged by the run's own rule: nothing would be left.
    assert main(["validate", path, "data.on_bad_record=skip"]) == 2
    assert "1:images.jsonl yielded no usable sample: all 4 records rejected" in error_line(capsys)
    assert main(["validate", path, "--no-data"]) == 0


def test_the_rule_reads_eval_datasets_too():
    stats = {"datasets": {"0:a.jsonl": {"records": 4, "used": 4, "rejected": 0, "rejected_by_reason": {}}},
             "eval_datasets": {"0:e.jsonl": {"records": 2, "used": 0, "rejected": 2,
                                             "rejected_by_reason": {"missing_media": 2}}}}
    with pytest.raises(UserError) as e:
        check_yield(stats, 0.5)
    assert e.value.what == "eval 0:e.jsonl yielded no usable sample: all 2 records rejected {'missing_media': 2}"
    check_yield({"datasets": stats["datasets"]}, 0.5)
