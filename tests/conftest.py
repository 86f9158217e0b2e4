"""Shared test setup: make tests/ importable for its data modules (real_configs)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


import os  # noqa: E402
import tempfile  # noqa: E402

# Prepacked expert graphs (edgemoe.offload.prepacked) go to a per-run directory, never the user's
# ~/.cache; set before any test (and any CLI subprocess, which inherits it) builds a store.
os.environ["EDGEMOE_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgemoe-test-cache-")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def deepseek_checkpoints(tmp_path_factory):
    """Tiny DeepSeek-VL2 checkpoints of both layouts (Tiny: MHA; Small: MLA), written once per run."""
    from edgemoe.model.create import create_checkpoint  # noqa: PLC0415

    root = tmp_path_factory.mktemp("deepseek")
    return {v: create_checkpoint(root / v, f"deepseek-vl2-{v}", "tiny").path for v in ("tiny", "small")}
