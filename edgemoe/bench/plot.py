"""`plot_report(report, path)`: decode tokens/s and hit rate against the expert budget, as a PNG.

Contract: matplotlib with the Agg backend, imported on call (the bench imports no plotting library
until asked). The x axis is the expert cache as a percentage of all expert bytes (the runtime's
resolved budget when it reported one); runs with only a memory budget and no resolved expert budget
cannot be placed and are left out. Left: one line per policy, each run's own physical limit (x),
the uniform-routing limit curve, and the peers (resident ones as horizontal lines, accelerate at its
budgets). Right: hit rate per policy.
"""

from __future__ import annotations

from pathlib import Path

from edgemoe.bench.results import EDGEMOE, BenchReport, BenchRun


def _expert_budget(run: BenchRun) -> int | None:
    """The budget asked for (in the bundle's file bytes), else the runtime's resolved one."""
    return run.budget_bytes if run.budget_bytes is not None else run.stats.expert_budget_bytes


def _percent(report: BenchReport, budget: int | None) -> float | None:
    total = report.token_bytes.expert_bytes_total
    return None if not total or budget is None else 100.0 * min(budget / total, 1.0)


def budget_percent(report: BenchReport, run: BenchRun) -> float | None:
    """Where an edgemoe run sits on the x axis: its expert cache as % of all expert bytes (the share
    the runtime reported, in its own units: a mapped store counts mapped, not file, bytes)."""
    fraction = run.stats.get("expert_cache_fraction")
    if fraction is not None:
        return 100.0 * min(float(fraction), 1.0)
    return _percent(report, _expert_budget(run))


def _series(report: BenchReport, runs, value) -> dict[str, list[tuple[float, float]]]:
    lines: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        x, y = budget_percent(report, run), value(run)
        if run.ok and x is not None and y is not None:
            store = f" ({run.expert_store})" if run.expert_store else ""
            lines.setdefault((run.policy or run.engine) + store, []).append((x, y))
    return {k: sorted(v) for k, v in lines.items()}


def plot_report(report: BenchReport, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edge = [r for r in report.runs if r.engine == EDGEMOE]
    fig, (speed, hits) = plt.subplots(1, 2, figsize=(12, 4.8))
    for policy, pts in _series(report, edge, lambda r: r.stats.decode_tokens_per_s).items():
        speed.plot(*zip(*pts), marker="o", label=f"edgemoe {policy}")
    bounds = _series(report, edge, lambda r: None if r.bound is None else r.bound.tokens_per_s)
    for i, pts in enumerate(bounds.values()):
        speed.scatter(*zip(*pts), marker="x", color="black", label="limit of each run" if i == 0 else None)
    curve = report.budget_curve()
    speed.plot([100 * f for f, _ in curve], [t for _, t in curve], color="black", linestyle="--",
               label=f"physical limit, uniform routing ({report.curve_link})")
    _peers(report, speed)
    speed.set(xlabel="expert cache (% of expert bytes)", ylabel="decode tokens/s", yscale="log",
              title="decode speed vs expert budget")
    speed.legend(fontsize=7)
    for policy, pts in _series(report, edge, lambda r: r.hit_rate).items():
        hits.plot(*zip(*pts), marker="o", label=policy)
    hits.set(xlabel="expert cache (% of expert bytes)", ylabel="hit rate (whole request)", ylim=(0, 1.05),
             title="expert cache hit rate")
    hits.legend(fontsize=7)
    fig.suptitle(f"{Path(report.bundle).name} on {report.machine.cpu_model} ({report.tokens} tokens)", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _peers(report: BenchReport, ax) -> None:
    colors = {}  # one colour per peer engine, after the policies' own
    for peer in report.peers:
        rate = peer.stats.decode_tokens_per_s
        if not peer.ok or rate is None:
            continue
        color = colors.setdefault(peer.engine, f"C{3 + len(colors)}")
        if peer.engine.startswith("accelerate"):
            x = _edge_budget(report, peer)
            if x is not None:
                labelled = peer.engine in ax.get_legend_handles_labels()[1]  # one legend entry for all budgets
                ax.scatter([x], [rate], marker="s", color=color, label=None if labelled else peer.engine)
        else:
            ax.axhline(rate, linestyle=":", linewidth=1.2, color=color, label=peer.label)


def _edge_budget(report: BenchReport, peer: BenchRun) -> float | None:
    """Where the edgemoe runs an accelerate peer was matched with sit on the x axis (%)."""
    matched = [budget_percent(report, r) for r in report.runs if r.budget_key == peer.budget_key]
    return next((b for b in matched if b is not None), None)
