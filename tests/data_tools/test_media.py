"""Decoding images and audio from real files of every supported kind."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from data_tools.conversation import BadRecord, Conversation, Message, Part
from data_tools.media import SAMPLE_RATE, load_audio, load_image, load_media

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def image(part_or_path, base_dir=".", **caps):
    part = part_or_path if isinstance(part_or_path, Part) else Part("image", ref=str(part_or_path), ref_kind="path")
    kw = {"max_pixels": 10_000_000, "max_bytes": 10_000_000, "allow_network": False} | caps
    return load_image(part, str(base_dir), **kw)


def audio(path, **caps):
    kw = {"max_seconds": 30.0, "policy": "trim", "max_bytes": 10_000_000, "allow_network": False} | caps
    return load_audio(Part("audio", ref=str(path), ref_kind="path"), ".", **kw)


def bad_reason(fn, *args, **kw) -> BadRecord:
    with pytest.raises(BadRecord) as e:
        fn(*args, **kw)
    return e.value


def left_right_image():
    """8x4: left half red, right half blue; shows where a rotation moved things."""
    img = Image.new("RGB", (8, 4), RED)
    img.paste(BLUE, (4, 0, 8, 4))
    return img


# -- images ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp"),
                                     ("GIF", "gif"), ("TIFF", "tif")])
def test_common_formats_decode_to_rgb(tmp_path, fmt, ext):
    path = tmp_path / f"x.{ext}"
    left_right_image().save(path, fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    img = image(path)
    assert img.mode == "RGB" and img.size == (8, 4)
    left, right = np.asarray(img)[2, 1].astype(int), np.asarray(img)[2, 6].astype(int)
    assert np.abs(left - RED).max() < 40 and np.abs(right - BLUE).max() < 40


def test_jpeg_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; viewers rotate 90 degrees clockwise
    left_right_image().save(tmp_path / "r.jpg", "JPEG", quality=95, exif=exif)
    img = image(tmp_path / "r.jpg")
    assert img.size == (4, 8)  # upright: width and height swap
    top, bottom = np.asarray(img)[1, 2].astype(int), np.asarray(img)[6, 2].astype(int)
    assert np.abs(top - RED).max() < 40 and np.abs(bottom - BLUE).max() < 40


def test_animated_gif_keeps_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert image(tmp_path / "a.gif").getpixel((0, 0)) == RED


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent blue → white
    rgba.save(tmp_path / "a.png")
    assert list(image(tmp_path / "a.png").getdata()) == [RED, WHITE]
    la = Image.new("LA", (1, 1), (0, 128))  # half-transparent black → mid grey
    la.save(tmp_path / "la.png")
    assert abs(image(tmp_path / "la.png").getpixel((0, 0))[0] - 127) <= 1
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255])
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png", transparency=1)
    assert list(image(tmp_path / "p.png").getdata()) == [RED, WHITE]


def test_cmyk_and_grey_modes(tmp_path):
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.jpg", "JPEG", quality=95)  # red in CMYK
    assert np.abs(np.asarray(image(tmp_path / "c.jpg"))[0, 0].astype(int) - RED).max() < 40
    Image.new("L", (2, 2), 77).save(tmp_path / "g.png")
    assert image(tmp_path / "g.png").getpixel((0, 0)) == (77, 77, 77)
    Image.new("1", (2, 2), 1).save(tmp_path / "b.bmp")
    assert image(tmp_path / "b.bmp").getpixel((0, 0)) == WHITE


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    """16-bit grey keeps its high byte (what llama.cpp's loader does); PIL's convert would clip
    every level above 255 to white."""
    levels = np.array([[0, 400, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode == "I;16"
    assert [p[0] for p in image(tmp_path / "16.png").getdata()] == [0, 1, 128, 255]
    assert [p[0] for p in Image.open(tmp_path / "16.png").convert("RGB").getdata()] == [0, 255, 255, 255]
    Image.fromarray(levels.astype(np.int32)).save(tmp_path / "32.tif")  # mode "I" holding 16-bit data
    assert [p[0] for p in image(tmp_path / "32.tif").getdata()] == [0, 1, 128, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert [p[0] for p in image(tmp_path / "f.tif").getdata()] == [0, 128, 255]


def test_a_16_bit_grey_png_is_the_same_pixels_in_training_generate_and_eval(tmp_path):
    """One loader: the data pipeline (training, eval's held-out items) and `generate`/`chat`'s
    command-line media decode a 16-bit grey PNG to the same RGB pixels, and the scaling is
    recorded where the data's stats count it."""
    from finetune.cli.eval import media_for_prompt

    yy, xx = np.mgrid[0:32, 0:32]
    Image.fromarray((xx * 2000 + yy * 40).astype(np.uint16)).save(tmp_path / "grey16.png")
    conv = Conversation([Message("user", [Part("image", ref="grey16.png", ref_kind="path")])],
                        base_dir=str(tmp_path))
    (trained,), _ = load_media(conv, _caps())
    assert conv.media_actions == ["scale_16bit_image"]
    served = media_for_prompt("image", str(tmp_path / "grey16.png"))
    assert trained.mode == served.mode == "RGB"
    assert np.array_equal(np.asarray(trained), np.asarray(served))
    want = (xx * 2000 + yy * 40) >> 8
    assert np.array_equal(np.asarray(trained)[..., 0], want) and float(want.mean()) < 200


def test_base64_and_relative_path(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), BLUE).save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    assert image(Part("image", ref=b64, ref_kind="base64")).getpixel((0, 0)) == BLUE
    assert image(Part("image", ref=b64.rstrip("="), ref_kind="base64")).getpixel((0, 0)) == BLUE
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (3, 3), RED).save(tmp_path / "imgs" / "r.png")
    assert image(Part("image", ref="imgs/r.png", ref_kind="path"), base_dir=tmp_path).getpixel((0, 0)) == RED


def test_bad_images(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    full = (tmp_path / "big.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "folder.png").mkdir()
    cases = [
        (tmp_path / "nope.png", {}, "missing_media"),
        (tmp_path / "empty.png", {}, "corrupt_media"),
        (tmp_path / "text.png", {}, "corrupt_media"),
        (tmp_path / "cut.png", {}, "corrupt_media"),
        (tmp_path / "folder.png", {}, "corrupt_media"),
        (tmp_path / "big.png", {"max_pixels": 9_999}, "media_too_large"),
        (tmp_path / "big.png", {"max_bytes": 10}, "media_too_large"),
        (Part("image", ref="!!not base64!!", ref_kind="base64"), {}, "corrupt_media"),
        (Part("image", ref="A" * 400, ref_kind="base64"), {"max_bytes": 100}, "media_too_large"),
        (Part("image", ref="https://example.org/x.png", ref_kind="url"), {}, "network_media"),
    ]
    for ref, caps, reason in cases:
        bad = bad_reason(image, ref, **caps)
        assert bad.reason == reason, (ref, bad)
    assert str(tmp_path / "nope.png") in bad_reason(image, tmp_path / "nope.png").detail
    assert image(tmp_path / "big.png", max_pixels=10_000).size == (100, 100)  # the cap is inclusive


def test_decompression_bomb_is_too_large(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses over 2x this at open
    assert bad_reason(image, tmp_path / "bomb.png").reason == "media_too_large"


def test_origin_is_carried(tmp_path):
    part = Part("image", ref="gone.png", ref_kind="path")
    bad = bad_reason(load_image, part, str(tmp_path), max_pixels=1, max_bytes=1, allow_network=False,
                     origin="train.jsonl:4")
    assert bad.origin == "train.jsonl:4" and str(bad).startswith("train.jsonl:4: ")


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server over tmp_path: real urllib fetches without leaving the machine."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_fetch_with_network_on(http_root):
    root, url = http_root
    Image.new("RGB", (5, 5), BLUE).save(root / "b.png")
    fetched = image(Part("image", ref=f"{url}/b.png", ref_kind="url"), allow_network=True)
    assert fetched.getpixel((2, 2)) == BLUE
    missing = bad_reason(image, Part("image", ref=f"{url}/none.png", ref_kind="url"), allow_network=True)
    assert missing.reason == "network_media" and "404" in missing.detail
    big = bad_reason(image, Part("image", ref=f"{url}/b.png", ref_kind="url"), allow_network=True, max_bytes=20)
    assert big.reason == "media_too_large"


# -- audio -------------------------------------------------------------------------------------

def sine(rate, seconds=1.0, freq=440.0, amp=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x, rate=SAMPLE_RATE):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()]


@pytest.mark.parametrize("name,rate,subtype,channels", [
    ("a.wav", 8000, "PCM_16", 1),
    ("b.wav", 44100, "PCM_16", 2),
    ("c.wav", 22050, "PCM_32", 1),
    ("d.wav", 48000, "FLOAT", 2),
    ("e.wav", 16000, "PCM_U8", 1),
    ("f.flac", 48000, "PCM_24", 1),
    ("g.ogg", 22050, "VORBIS", 2),
    ("h.mp3", 44100, "MPEG_LAYER_III", 1),
])
def test_audio_formats_resample_to_16k_mono(tmp_path, name, rate, subtype, channels):
    assert name.split(".")[1].upper() in {"WAV", "FLAC", "OGG", "MP3"} & set(sf.available_formats())
    wave = sine(rate)
    sf.write(tmp_path / name, np.stack([wave] * channels, axis=1), rate, subtype=subtype)
    x = audio(tmp_path / name)
    assert x.dtype == np.float32 and x.ndim == 1
    # MP3 encoders pad the start; everything else keeps the length exactly.
    assert abs(len(x) - SAMPLE_RATE) <= (2000 if name.endswith(".mp3") else 1)
    assert abs(peak_hz(x) - 440) < 3
    assert 0.4 < np.abs(x).max() < 0.6


def test_int_pcm_is_scaled_to_unit_range_and_channels_averaged(tmp_path):
    full = np.full((1600, 2), [32767, -32768], dtype=np.int16)  # left at +max, right at -max
    full[:, 1] = 0
    sf.write(tmp_path / "s.wav", full, 16000, subtype="PCM_16")
    x = audio(tmp_path / "s.wav")
    assert len(x) == 1600 and np.allclose(x, 0.5, atol=1e-3)  # (1.0 + 0.0) / 2
    ints = np.full(800, 2**31 - 1, dtype=np.int32)
    sf.write(tmp_path / "i.wav", ints, 16000, subtype="PCM_32")
    assert np.allclose(audio(tmp_path / "i.wav"), 1.0, atol=1e-6)


def test_long_audio_is_trimmed_or_rejected(tmp_path):
    sf.write(tmp_path / "long.wav", sine(44100, seconds=3.0), 44100)
    assert len(audio(tmp_path / "long.wav", max_seconds=1.0)) == SAMPLE_RATE
    assert len(audio(tmp_path / "long.wav", max_seconds=0.5)) == SAMPLE_RATE // 2
    bad = bad_reason(audio, tmp_path / "long.wav", max_seconds=1.0, policy="reject")
    assert bad.reason == "media_too_large" and "3.0 s" in bad.detail
    assert len(audio(tmp_path / "long.wav", max_seconds=3.0, policy="reject")) == 3 * SAMPLE_RATE


def test_audio_base64_and_relative_path(tmp_path):
    buf = io.BytesIO()
    sf.write(buf, sine(8000), 8000, format="WAV")
    part = Part("audio", ref=base64.b64encode(buf.getvalue()).decode(), ref_kind="base64")
    x = load_audio(part, ".", max_seconds=30, policy="trim", max_bytes=10**6, allow_network=False)
    assert len(x) == SAMPLE_RATE and abs(peak_hz(x) - 440) < 3
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "c.flac", sine(16000, 0.25), 16000)
    rel = Part("audio", ref="clips/c.flac", ref_kind="path")
    assert len(load_audio(rel, str(tmp_path), max_seconds=30, policy="trim", max_bytes=10**6,
                          allow_network=False)) == 4000


def test_bad_audio(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(0, dtype=np.float32), 16000)
    (tmp_path / "text.wav").write_text("RIFF but not really")
    (tmp_path / "empty.wav").write_bytes(b"")
    Image.new("RGB", (2, 2)).save(tmp_path / "image.wav", "PNG")
    sf.write(tmp_path / "nan.wav", np.array([0.0, np.nan], dtype=np.float32), 16000, subtype="FLOAT")
    sf.write(tmp_path / "ok.wav", sine(16000), 16000)
    cases = [
        ("missing.wav", {}, "missing_media"),
        ("silent.wav", {}, "corrupt_media"),
        ("text.wav", {}, "corrupt_media"),
        ("empty.wav", {}, "corrupt_media"),
        ("image.wav", {}, "corrupt_media"),
        ("nan.wav", {}, "corrupt_media"),
        ("ok.wav", {"max_bytes": 100}, "media_too_large"),
    ]
    for name, caps, reason in cases:
        assert bad_reason(audio, tmp_path / name, **caps).reason == reason, name
    url = Part("audio", ref="http://example.org/a.wav", ref_kind="url")
    bad = bad_reason(load_audio, url, ".", max_seconds=1, policy="trim", max_bytes=10, allow_network=False)
    assert bad.reason == "network_media" and "allow_network_media" in bad.detail


# -- a whole conversation under the recipe's caps ------------------------------------------------

def _caps(**kw):
    """The fields of the recipe's data section that load_media reads."""
    return SimpleNamespace(**({"max_image_pixels": 10_000_000, "max_media_bytes": 10_000_000,
                               "allow_network_media": False, "max_audio_seconds": 30.0,
                               "audio_overflow": "trim"} | kw))


def test_load_media_keeps_order_per_kind_and_applies_the_caps(tmp_path):
    left_right_image().save(tmp_path / "a.png")
    Image.new("RGB", (20, 10), BLUE).save(tmp_path / "b.png")
    sf.write(tmp_path / "one.wav", np.full(SAMPLE_RATE, 0.25, np.float32), SAMPLE_RATE)
    sf.write(tmp_path / "two.wav", np.full(2 * SAMPLE_RATE, 0.5, np.float32), SAMPLE_RATE)
    parts = [Part("audio", ref="two.wav", ref_kind="path"), Part("image", ref="a.png", ref_kind="path"),
             Part("text", text="and"), Part("audio", ref="one.wav", ref_kind="path")]
    conv = Conversation([Message("user", parts), Message("assistant", [Part("image", ref="b.png", ref_kind="path")])],
                        origin="d.jsonl:3", base_dir=str(tmp_path))
    images, audios = load_media(conv, _caps())
    assert [im.size for im in images] == [(8, 4), (20, 10)]
    assert [len(a) for a in audios] == [2 * SAMPLE_RATE, SAMPLE_RATE]
    assert audios[0][0] == pytest.approx(0.5) and audios[1][0] == pytest.approx(0.25)
    # Every cap comes from the data section: seconds (trim, then reject), pixels, bytes.
    _, trimmed = load_media(conv, _caps(max_audio_seconds=1.5))
    assert [len(a) for a in trimmed] == [int(1.5 * SAMPLE_RATE), SAMPLE_RATE]
    e = bad_reason(load_media, conv, _caps(max_audio_seconds=1.5, audio_overflow="reject"))
    assert e.reason == "media_too_large" and e.origin == "d.jsonl:3"
    assert bad_reason(load_media, conv, _caps(max_image_pixels=100)).reason == "media_too_large"
    assert bad_reason(load_media, conv, _caps(max_media_bytes=50)).reason == "media_too_large"
    url = Conversation([Message("user", [Part("image", ref="http://127.0.0.1:9/x.png", ref_kind="url")])])
    assert bad_reason(load_media, url, _caps()).reason == "network_media"


# -- cut-off files and what decoding changed (issue 24) ------------------------------------------

@pytest.mark.parametrize("subtype,rate", [("PCM_24", 44100), ("PCM_16", 16000)])
def test_truncated_wav_is_rejected_not_shortened(tmp_path, subtype, rate):
    """A WAV cut after 30 % of its bytes keeps a header that says 0.9 s; libsndfile reads the
    0.27 s that are there. It is rejected (its transcript would describe the lost 0.63 s)."""
    buf = io.BytesIO()
    sf.write(buf, sine(rate, seconds=0.9), rate, format="WAV", subtype=subtype)
    whole = buf.getvalue()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) * 3 // 10])
    bad = bad_reason(audio, tmp_path / "cut.wav")
    assert bad.reason == "truncated_media"
    assert "header says 0.90 s" in bad.detail and "cut.wav" in bad.detail
    # The whole file, and a cut one whose kept start is all that max_audio_seconds keeps, pass.
    (tmp_path / "whole.wav").write_bytes(whole)
    assert len(audio(tmp_path / "whole.wav")) == int(0.9 * SAMPLE_RATE)
    assert len(audio(tmp_path / "cut.wav", max_seconds=0.2)) == int(0.2 * SAMPLE_RATE)


def test_truncated_mp3_is_rejected(tmp_path):
    """An MP3 cut in half: its Xing header still counts 1.7 s of frames."""
    assert "MP3" in sf.available_formats()
    buf = io.BytesIO()
    sf.write(buf, sine(16000, seconds=1.7), 16000, format="MP3", subtype="MPEG_LAYER_III")
    whole = buf.getvalue()
    (tmp_path / "cut.mp3").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "whole.mp3").write_bytes(whole)
    bad = bad_reason(audio, tmp_path / "cut.mp3")
    assert bad.reason == "truncated_media" and "header says 1.70 s" in bad.detail
    assert abs(len(audio(tmp_path / "whole.mp3")) - int(1.7 * SAMPLE_RATE)) <= 2000


def test_load_media_records_cutting_and_resampling(tmp_path):
    sf.write(tmp_path / "long.wav", sine(44100, seconds=3.0), 44100)
    sf.write(tmp_path / "native.wav", sine(SAMPLE_RATE, seconds=1.0), SAMPLE_RATE)
    conv = Conversation([Message("user", [Part("audio", ref="long.wav", ref_kind="path"),
                                          Part("audio", ref="native.wav", ref_kind="path")])],
                        base_dir=str(tmp_path))
    load_media(conv, _caps(max_audio_seconds=2.0))
    assert conv.media_actions == ["cut_audio", "resample_audio"]
    load_media(conv, _caps())
    assert conv.media_actions == ["resample_audio"]
