"""Shared test setup: make tests/ importable for its data modules (real_configs)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
