"""Decode the media of a `Part`: images to RGB PIL images, audio to 16 kHz mono float32.

`load_media` does it for a whole conversation under the recipe's caps; `load_image` and
`load_audio` for one part.

Every failure is a `BadRecord` with a stable reason (missing_media, corrupt_media,
media_too_large, network_media, truncated_media), so a bad file rejects one sample instead of
stopping a run. Caps (bytes, pixels, seconds) are checked before the expensive decode wherever
the format allows it: a decompression bomb or an hour-long clip is refused from its header.
An audio file that decodes shorter than its header says (a cut-off download) is truncated_media,
never a shorter clip: its transcript would no longer match. What decoding changed on purpose
(audio cut to max_audio_seconds, resampled to 16 kHz) is appended to `Conversation.media_actions`.

16-bit grey images keep their high byte (v >> 8, what llama.cpp's loader does; 32-bit and float
grey are scaled from their range onto 0..255 the same way). PIL's own `convert("RGB")`, which
HF processors and vLLM apply to a file, clips them at 255 instead: mostly white. Training,
`generate`, `eval` and `chat` all decode through `load_image`, so the model is trained and judged
on the same pixels; that such an image was scaled is recorded ("scale_16bit_image", counted
in overflow_actions), since a server that clips would show the model other pixels.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import math
import os
import urllib.error
import urllib.request

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageOps

from data_tools.conversation import BadRecord, Conversation, Part

SAMPLE_RATE = 16_000
FETCH_TIMEOUT_S = 30
# Compressed formats (MP3) may decode a codec frame or two off the length their header states
# (encoder delay and padding); 50 ms is above that and far below any cut-off that loses a word.
TRUNCATION_SLACK_S = 0.05


def load_image(part: Part, base_dir: str, *, max_pixels: int, max_bytes: int, allow_network: bool,
               origin: str = "", actions: list | None = None) -> Image.Image:
    """The image of `part` as RGB, upright (EXIF orientation applied), transparency on white;
    more than 8 bits per grey level scaled down (appends "scale_16bit_image" to `actions`)."""
    data, name = _read_bytes(part, base_dir, max_bytes=max_bytes, allow_network=allow_network, origin=origin)
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only: the size is known before decoding
        if img.width * img.height > max_pixels:
            raise BadRecord("media_too_large", f"image {name} has {img.width}x{img.height} pixels, "
                            f"over max_image_pixels={max_pixels}", origin)
        img.load()  # decode now, so a truncated file is rejected here and not inside the processor
        if actions is not None and (img.mode.startswith("I") or img.mode == "F"):
            actions.append("scale_16bit_image")
        return _to_rgb(ImageOps.exif_transpose(img))  # an animated GIF/WebP keeps its first frame
    except Image.DecompressionBombError as e:
        raise BadRecord("media_too_large", f"image {name}: {e}", origin) from None
    except BadRecord:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error... on bad files
        raise BadRecord("corrupt_media", f"cannot decode image {name} ({type(e).__name__}: {e})", origin) from None


def load_audio(part: Part, base_dir: str, *, max_seconds: float, policy: str, max_bytes: int,
               allow_network: bool, origin: str = "", actions: list | None = None) -> np.ndarray:
    """The audio of `part` as float32 mono at 16 kHz, in [-1, 1] for integer formats.

    Longer than `max_seconds`: `policy="trim"` keeps the start (and appends "cut_audio" to
    `actions`), `"reject"` raises media_too_large. Resampling appends "resample_audio".
    """
    data, name = _read_bytes(part, base_dir, max_bytes=max_bytes, allow_network=allow_network, origin=origin)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            # libsndfile corrects a WAV's frame count to what the file holds; the header's own
            # count is what the file was meant to hold.
            frames = max(f.frames, wav_header_frames(data) or 0)
            if frames > max_seconds * rate and policy == "reject":
                raise BadRecord("media_too_large", f"audio {name} lasts {frames / rate:.1f} s, "
                                f"over max_audio_seconds={max_seconds}", origin)
            # Read only what is kept; int PCM comes back scaled to [-1, 1] by libsndfile.
            want = min(frames, math.ceil(max_seconds * rate))
            wave = f.read(want, dtype="float32", always_2d=True)
    except (RuntimeError, TypeError, ValueError) as e:  # sf.LibsndfileError is a RuntimeError
        raise BadRecord("corrupt_media", f"cannot decode audio {name} ({e}); soundfile reads "
                        "WAV, FLAC, OGG/Vorbis/Opus, MP3 and more, not AAC/M4A", origin) from None
    if wave.shape[0] == 0:
        raise BadRecord("corrupt_media", f"audio {name} has no samples", origin)
    if wave.shape[0] < want - TRUNCATION_SLACK_S * rate:
        raise BadRecord("truncated_media", f"audio {name} decodes to {wave.shape[0] / rate:.2f} s but its "
                        f"header says {frames / rate:.2f} s: the file is cut off", origin)
    if actions is not None and frames > want:
        actions.append("cut_audio")
    mono = wave.mean(axis=1)  # frames x channels -> frames
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE)
        if actions is not None:
            actions.append("resample_audio")
    mono = mono[: int(max_seconds * SAMPLE_RATE)]  # trim exactly; the read above rounds up
    if not np.isfinite(mono).all():
        raise BadRecord("corrupt_media", f"audio {name} holds NaN or infinite samples", origin)
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_media(conv: Conversation, data) -> tuple[list[Image.Image], list[np.ndarray]]:
    """Every image and audio clip of `conv`, in order, under the caps of `data` (the recipe's
    data section, or anything with the same fields: max_image_pixels, max_media_bytes,
    allow_network_media, max_audio_seconds, audio_overflow)."""
    images, audios = [], []
    conv.media_actions = []
    for p in conv.media():
        if p.type == "image":
            images.append(load_image(p, conv.base_dir, max_pixels=data.max_image_pixels,
                                     max_bytes=data.max_media_bytes,
                                     allow_network=data.allow_network_media, origin=conv.origin,
                                     actions=conv.media_actions))
        else:
            audios.append(load_audio(p, conv.base_dir, max_seconds=data.max_audio_seconds,
                                     policy=data.audio_overflow, max_bytes=data.max_media_bytes,
                                     allow_network=data.allow_network_media, origin=conv.origin,
                                     actions=conv.media_actions))
    return images, audios


def wav_header_frames(data: bytes) -> int | None:
    """The frame count a RIFF/WAVE header declares (its data chunk's size over the frame size),
    or None when `data` is no WAV or the size is left open (a streamed WAV)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, block = 12, 0
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if cid == b"fmt " and pos + 22 <= len(data):
            block = int.from_bytes(data[pos + 20:pos + 22], "little")  # nBlockAlign
        elif cid == b"data":
            return size // block if block and 0 < size < 0xFFFFFFFF else None
        pos += 8 + size + (size & 1)  # chunks are padded to even sizes
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # PIL's own convert clips these to 0..255; scale the real range instead.
        return Image.fromarray(_to_uint8(np.asarray(img), img.mode), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Map 16-bit, 32-bit int and float grey levels onto 0..255 (see the module docstring)."""
    a = np.nan_to_num(pixels.astype(np.float64))
    lo, hi = float(a.min()), float(a.max())
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and 255 < hi <= 65535):  # 16-bit data
        return (pixels.astype(np.uint32) >> 8).astype(np.uint8)  # the high byte, as llama.cpp reads it
    if lo >= 0 and hi <= 1 and mode == "F":  # float images are usually 0..1
        scale = 1.0
    elif lo >= 0 and hi <= 255:
        scale = 255.0
    else:  # anything else (negative, huge): stretch what is there
        a, scale = a - lo, max(hi - lo, 1e-12)
    return np.clip(np.rint(a / scale * 255.0), 0, 255).astype(np.uint8)


# -- bytes from a path, a URL or base64 ----------------------------------------------------

def local_path(part: Part, base_dir: str) -> str | None:
    """The file a media part names on disk (None for a URL or inline base64)."""
    if part.ref_kind in ("url", "base64") or not part.ref:
        return None
    return os.path.join(base_dir, os.path.expanduser(part.ref))


def file_state(path: str) -> list:
    """[size, mtime_ns] of a file, or [] when it does not exist: what the cache key of a media
    file is (replacing or adding a file changes it)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    return [st.st_size, st.st_mtime_ns]


def _read_bytes(part: Part, base_dir: str, *, max_bytes: int, allow_network: bool,
                origin: str) -> tuple[bytes, str]:
    """(the encoded file, a name for messages), with the byte cap applied."""
    ref = part.ref or ""
    if part.ref_kind == "base64":
        name = f"<base64 {part.type}>"
        text = "".join(ref.split(",", 1)[1].split() if ref.startswith("data:") else ref.split())
        if len(text) * 3 // 4 > max_bytes:  # decoded size, known without decoding
            raise BadRecord("media_too_large", f"{name} is over max_media_bytes={max_bytes}", origin)
        try:
            data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRecord("corrupt_media", f"{name} is not valid base64 ({e})", origin) from None
    elif part.ref_kind == "url":
        name = ref
        data = _fetch(ref, max_bytes=max_bytes, allow_network=allow_network, origin=origin)
    else:
        name = local_path(part, base_dir)
        if not os.path.exists(name):
            raise BadRecord("missing_media", f"{part.type} file {name} does not exist", origin)
        if not os.path.isfile(name):
            raise BadRecord("corrupt_media", f"{part.type} path {name} is not a file", origin)
        if os.path.getsize(name) > max_bytes:
            raise BadRecord("media_too_large", f"{name} is over max_media_bytes={max_bytes}", origin)
        with open(name, "rb") as f:
            data = f.read()
    if not data:
        raise BadRecord("corrupt_media", f"{part.type} {name} is empty", origin)
    return data, name


def _fetch(url: str, *, max_bytes: int, allow_network: bool, origin: str) -> bytes:
    if not allow_network:
        raise BadRecord("network_media", f"{url} is a URL and data.allow_network_media is false "
                        "(set it to true, or download the file and give its path)", origin)
    request = urllib.request.Request(url, headers={"User-Agent": "finetune"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(max_bytes + 1)  # one byte over tells "too large" without reading it all
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise BadRecord("network_media", f"cannot fetch {url} ({e})", origin) from None
    if len(data) > max_bytes:
        raise BadRecord("media_too_large", f"{url} is over max_media_bytes={max_bytes}", origin)
    return data
