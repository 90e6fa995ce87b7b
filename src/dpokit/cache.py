"""Where dpokit keeps what it computes once: models converted from GGUF (models/load.py) and reference
log-probs (logprobs/refcache.py). At the bottom of the import order: both import it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$DPOKIT_CACHE, else $XDG_CACHE_HOME/dpokit, else ~/.cache/dpokit."""
    if os.environ.get("DPOKIT_CACHE"):
        return Path(os.environ["DPOKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpokit"
