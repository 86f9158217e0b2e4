"""A bench report for people: the machine and its limits, the sweep table, the peers and their ratios.

Contract: `render_report(report, console)` prints rich tables and never changes the report; the CLI
calls it (the library itself never prints). Sizes are decimal (MB, GB) as `edgemoe inspect` prints
them; "-" marks a number the run did not report.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from edgemoe.bench.results import BenchReport, BenchRun


def _f(value: float | None, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    return "-" if value is None else fmt.format(value / scale)


def _n(value: float | None) -> str:
    """Three significant digits without exponents: 0.196, 79.1, 603, 32,500."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def header_lines(report: BenchReport) -> list[str]:
    bw, tb = report.bandwidths, report.token_bytes
    memory = f"memory {bw.memory_1t / 1e9:.1f} GB/s (1 thread)"
    if bw.memory_mt is not None:
        memory += f", {bw.memory_mt / 1e9:.1f} GB/s ({bw.memory_threads} threads)"
    disk = ("disk: nothing read" if bw.disk_cold is None else
            f"disk {bw.disk_cold / 1e9:.2f} GB/s cold, {bw.disk_warm / 1e9:.2f} GB/s warm "
            f"({bw.disk_probe_bytes / 1e6:.0f} MB; {bw.disk_note})")
    experts = ", ".join(f"{n} {p}" for p, n in report.expert_precisions)
    return [
        f"[bold]{report.bundle}[/]: {report.bundle_bytes / 1e9:.2f} GB, experts {experts}; "
        f"{report.tokens} tokens, {'cold' if report.cold else 'warm'} runs, routing: "
        f"{'uniform (benchmark mode: experts drawn at random)' if report.routing == 'uniform' else 'the model weights'}",
        f"machine: {report.machine.summary}",
        f"measured: {memory}; {disk}",
        f"a decoded token at context {tb.context_tokens} touches {tb.resident_bytes / 1e6:.0f} MB resident "
        f"(trunk {tb.trunk_bytes / 1e6:.0f}, experts {tb.experts_bytes / 1e6:.0f}, KV {tb.kv_bytes / 1e6:.0f})",
    ]


def runs_table(runs: tuple[BenchRun, ...], title: str) -> Table:
    """One row per run; RSS is ru_maxrss, footprint the sampled peak of RSS plus the model files' page
    cache the run keeps, disk the bytes read from storage per decoded token."""
    t = Table(title=title)
    t.add_column("run", no_wrap=True)
    for col in ("TTFT s", "tok/s", "hit", "pred P/R", "MB paged/tok", "disk MB/tok", "RSS GB", "footprint GB",
                "limit tok/s", "of limit"):
        t.add_column(col, justify="right")
    for r in runs:
        if not r.ok:
            t.add_row(r.label, "[red]failed[/]", *[""] * 9)
            continue
        s = r.stats
        pr = ("-" if s.prediction_precision is None and s.prediction_recall is None else
              f"{_pct(s.prediction_precision).rstrip('%')}/{_pct(s.prediction_recall)}")
        paged = _f(r.bytes_paged_per_token, "{:.1f}", 1e6)
        if r.paged_scope == "total" and r.bytes_paged_per_token is not None:
            paged += "*"
        disk = (None if s.decode_disk_read_bytes is None or not r.decoded_tokens
                else s.decode_disk_read_bytes / r.decoded_tokens)
        t.add_row(r.label, _n(s.time_to_first_token_s), _n(s.decode_tokens_per_s), _pct(r.hit_rate), pr, paged,
                  _f(disk, "{:.1f}", 1e6), _f(r.peak_rss_bytes, scale=1e9), _f(r.peak_footprint_bytes, scale=1e9),
                  _n(None if r.bound is None else r.bound.tokens_per_s), _pct(r.fraction_of_bound))
    return t


def _failures(console: Console, runs: tuple[BenchRun, ...]) -> None:
    for r in runs:
        if not r.ok:
            console.print(f"[red]{r.label} failed:[/] {r.error}", highlight=False)


def comparisons_table(report: BenchReport) -> Table:
    t = Table(title="peers / edgemoe (decode < 1: the peer is slower; RSS > 1: the peer needs more memory)")
    for col in ("peer", "edgemoe run", "decode", "TTFT", "peak RSS"):
        t.add_column(col, justify="left" if col in ("peer", "edgemoe run") else "right")
    for c in report.comparisons():
        t.add_row(c.peer, c.run, _f(c.decode_ratio, "{:.3g}x"), _f(c.ttft_ratio, "{:.3g}x"),
                  _f(c.peak_rss_ratio, "{:.3g}x"))
    return t


def render_report(report: BenchReport, console: Console) -> None:
    for line in header_lines(report):
        console.print(line)
    console.print(runs_table(report.runs, "edgemoe sweep"))
    _failures(console, report.runs)
    if any(r.ok and r.paged_scope == "total" for r in report.runs):
        console.print("* paged bytes include prefill paging (the runtime reports no decode-only figure)")
    if report.peers:
        console.print(runs_table(report.peers, "peers"))
        _failures(console, report.peers)
        console.print(comparisons_table(report))
