"""Memory-budget benchmarking: sweeps, the measured physical limit, and peers.

    from edgemoe.bench import BenchOptions, run_bench, render_report, plot_report
    report = run_bench("bundle", BenchOptions.parse("100%,50%", policies="lru,edgemoe", tokens=32))
    report.to_json()                      # BenchReport -> JSON; BenchReport.from_json() reads it back

Modules, one responsibility each: budgets (budget lists), child (a fresh process measured from
outside: wait4's ru_maxrss and psutil polling), limits (bandwidth probes and the bytes a decoded token
touches -> its physical limit), machine (CPU, flags, RAM, versions), prompt (the request), sweep
(the budget x policy runs), peers / peer_child (torch resident, accelerate disk offload, our own
all-resident ceiling), results + codec (frozen dataclasses <-> JSON), view (rich tables), plot.
Nothing here imports torch (peer_child does, inside its own process) or matplotlib (plot, on call).
"""

from edgemoe.bench.budgets import Budget, parse_budgets, parse_size
from edgemoe.bench.child import ChildRun, parse_json_output, run_child
from edgemoe.bench.errors import BenchError
from edgemoe.bench.limits import (Bandwidths, DecodeBound, TokenBytes, decode_bound, measure_bandwidths,
                                  measure_disk_read, measure_memory_bandwidth, token_bytes, uniform_paged_bytes)
from edgemoe.bench.machine import MachineInfo, machine_info
from edgemoe.bench.plot import plot_report
from edgemoe.bench.results import BenchReport, BenchRun, PeerComparison, RunStats
from edgemoe.bench.sweep import BenchOptions, run_bench
from edgemoe.bench.view import render_report

__all__ = ["Bandwidths", "BenchError", "BenchOptions", "BenchReport", "BenchRun", "Budget", "ChildRun",
           "DecodeBound", "MachineInfo", "PeerComparison", "RunStats", "TokenBytes", "decode_bound", "machine_info",
           "measure_bandwidths", "measure_disk_read", "measure_memory_bandwidth", "parse_budgets", "parse_json_output",
           "parse_size", "plot_report", "render_report", "run_bench", "run_child", "token_bytes",
           "uniform_paged_bytes"]
