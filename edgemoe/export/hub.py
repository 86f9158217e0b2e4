"""A checkpoint argument as a directory: a local path as given, a Hugging Face hub id downloaded.

Contract: `resolve_checkpoint(spec)` returns `Path(spec)` when it exists; otherwise, when `spec` looks
like a hub id (`owner/name`, e.g. LanguageBind/MoE-LLaVA-StableLM-1.6B-4e), the local snapshot that
`huggingface_hub.snapshot_download` returns (from its cache when offline and already downloaded).
Without a network the answer is one line saying so and what to do instead, never a traceback; a
spec that is neither an existing path nor a hub id is "not found". Whether the directory is a
checkpoint is `Checkpoint.open`'s question, not this module's.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from edgemoe.errors import CheckpointError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# What a MoE-LLaVA repo holds that the exporter reads: configs, weights, tokenizer files.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.tiktoken", "*.txt", "*.model"]


def is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/")) and ".." not in spec


def resolve_checkpoint(spec: str | Path) -> Path:
    """A local checkpoint directory for `spec` (module docstring)."""
    path = Path(spec)
    if path.exists():
        return path
    text = str(spec)
    if not is_hub_id(text):
        raise CheckpointError(f"checkpoint directory not found: {text}")
    return download(text)


def download(repo_id: str) -> Path:
    """snapshot_download(repo_id), or a one-line CheckpointError when it cannot be reached."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"{repo_id} is not a local directory and huggingface_hub is not installed") from None
    log.info("downloading %s from the Hugging Face hub", repo_id)
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=ALLOW_PATTERNS))
    except Exception as exc:  # offline (LocalEntryNotFoundError, ConnectionError), unknown repo, auth, ...
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(
            f"{repo_id} is not a local directory and could not be downloaded from the Hugging Face hub "
            f"({type(exc).__name__}: {reason}); check the network, or download it elsewhere "
            f"(huggingface-cli download {repo_id} --local-dir DIR) and pass DIR"
        ) from None
