"""Where a name points: a local path or a Hugging Face hub id. One rule for models and data.

A name is a hub id when it is `owner/name` (owner starting with a letter or digit, no further
slashes) and nothing by that name exists on disk. Anything else (`./x`, `/abs/x`, `~/x`,
`a/b/c`, a bare folder name) is a local path, and a missing one is reported as missing, not
looked up on the hub.
"""

from __future__ import annotations

import os
import re

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` in the hub's spelling (says nothing about whether it exists there)."""
    return bool(_HUB_ID.fullmatch(name))


def is_hub_id(name: str, base_dir: str | None = None) -> bool:
    """A hub id: the hub's spelling and no such path on disk (relative to `base_dir` if given)."""
    path = os.path.join(base_dir, name) if base_dir else name
    return looks_like_hub_id(name) and not os.path.exists(os.path.expanduser(path))


def hub_reachable() -> bool:
    """False in offline mode or when the hub's name does not resolve (libraries would spend
    ~30 s in retries before failing)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except OSError:
        return False
    return True


def in_hub_cache(repo_id: str, filename: str = "config.json", repo_type: str = "model") -> bool:
    """Whether `filename` of hub repo `repo_id` is in this machine's hub cache already."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return False
