"""torch and transformers stay out of the runtime's import path (they belong to export and tests)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import edgemoe

# Packages allowed to import torch: the reference model, the exporter (which validates against it)
# and the generator's pickle branch, which imports torch lazily inside a function.
HEAVY = ("edgemoe.reference", "edgemoe.export")


def runtime_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(edgemoe.__path__, "edgemoe.")]
    return sorted(n for n in names if not n.startswith(HEAVY))


def test_runtime_modules_do_not_import_torch_or_transformers() -> None:
    modules = runtime_modules()
    assert "edgemoe.cli" in modules and "edgemoe.model.checkpoint" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"runtime path imported {result.stdout.strip()}"
