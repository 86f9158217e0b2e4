"""The bench package's error: one line, naming the option, run or probe at fault."""

from __future__ import annotations

from edgemoe.errors import EdgeMoEError


class BenchError(EdgeMoEError):
    """A benchmark cannot be set up or run as asked (bad option, missing peer input, failed probe)."""
