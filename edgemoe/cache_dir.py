"""Where edgemoe keeps what it computes once per machine: prepacked experts, hash ledgers, prompt caches.

Contract: `cache_root()` is `$EDGEMOE_CACHE_DIR`, else `$XDG_CACHE_HOME/edgemoe`, else
`~/.cache/edgemoe`; nothing is created here. A leaf module, so that the bundle reader, the offload
stores and the runtime can all name the same place without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The user's edgemoe cache directory (module docstring)."""
    explicit = os.environ.get("EDGEMOE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edgemoe"
