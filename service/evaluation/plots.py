"""The report's PNG plots (matplotlib, headless). AUC plots carry +-1 standard error bars,
so a difference smaller than the noise of the held-out set looks like one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.evaluation.live_results import READ_TARGETS, LiveResults, RateResult, read_row
from service.evaluation.offline import OfflineResults


def render_plots(
    live: LiveResults | None, offline: OfflineResults | None, assets: Path, prefix: str
) -> dict[str, str]:
    """Render every plot the results allow into ``assets``; return name -> the path
    ``prefix/name.png`` that report.md links."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, str] = {}

    def save(name: str, figure: Any) -> None:
        figure.tight_layout()
        figure.savefig(assets / f"{name}.png", dpi=110)
        plt.close(figure)
        made[name] = f"{prefix}/{name}.png"

    if live is not None and live.rates:
        save("freshness", _freshness_figure(plt, live.rates))
        save("reads", _reads_figure(plt, live))
    if offline is not None:
        save("value_of_freshness", _value_figure(plt, offline))
        save("stabilization", _stabilization_figure(plt, offline))
        save("retrain", _retrain_figure(plt, offline))
    return made


def _label(rate: float) -> str:
    return f"{rate:,.0f} ev/s"


def _freshness_figure(plt: Any, rates: Sequence[RateResult]) -> Any:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    offered = [r.offered_rate for r in rates]
    for label, key in (("p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms")):
        left.plot(offered, [getattr(r.probes, key) for r in rates], marker="o", label=label)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="offered events/s",
        ylabel="event -> served embedding (ms)",
        title="Freshness",
    )
    left.legend()
    for r in rates:
        t = [s[0] for s in r.queue_samples]
        right.plot(t, [s[1] for s in r.queue_samples], label=_label(r.offered_rate))
    right.set(
        xlabel="seconds into the rate's phase",
        ylabel="users in the dirty queue",
        title="Dirty queue depth",
    )
    right.legend()
    return figure


def _value_figure(plt: Any, offline: OfflineResults) -> Any:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [r.label for r in offline.freshness]
    aucs = [r.auc for r in offline.freshness]
    left.errorbar(
        labels,
        aucs,
        yerr=[offline.auc_error(a) for a in aucs],
        marker="o",
        capsize=3,
        label="frozen ranker (+-1 s.e.)",
    )
    left.axhline(
        offline.no_user_embedding.auc, color="grey", linestyle="--", label="no user embedding"
    )
    left.set(xlabel="embedding staleness", ylabel="click AUC", title="AUC vs staleness")
    left.legend()
    right.plot(labels, [r.ne for r in offline.freshness], marker="o", color="tab:red")
    right.axhline(offline.no_user_embedding.ne, color="grey", linestyle="--")
    right.set(
        xlabel="embedding staleness",
        ylabel="normalized entropy (lower is better)",
        title="NE vs staleness",
    )
    return figure


def _stabilization_figure(plt: Any, offline: OfflineResults) -> Any:
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for row in offline.stabilization:
        axis.errorbar(
            row.jitter_mean, row.auc, yerr=offline.auc_error(row.auc), marker="o", capsize=3
        )
        axis.annotate(
            row.name,
            (row.jitter_mean, row.auc),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    axis.set(
        xlabel="jitter: mean 1 - cosine between consecutive serves",
        ylabel="frozen ranker click AUC (+-1 s.e.)",
        title="Stabilization: jitter vs AUC",
    )
    return figure


def _retrain_figure(plt: Any, offline: OfflineResults) -> Any:
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1.3]}
    )
    names = ["v1 (reference)", "v2 unaligned", "v2 aligned", "v2 + retrained ranker"]
    aucs = [r.auc for r in offline.retrain]
    left.bar(
        names,
        aucs,
        yerr=[offline.auc_error(a) for a in aucs],
        capsize=4,
        color=["tab:blue", "tab:red", "tab:green", "tab:grey"],
    )
    left.axhline(
        offline.no_user_embedding.auc, color="grey", linestyle="--", label="no user embedding"
    )
    lows = [*aucs, offline.no_user_embedding.auc]
    left.set(
        ylim=(min(lows) - 0.02, max(lows) + 0.02),
        ylabel="click AUC (+-1 s.e.)",
        title="Ranker trained on v1, across a retrain",
    )
    left.legend()
    right.bar(
        ["unaligned", "aligned"],
        [offline.drift.mean_cosine_unaligned, offline.drift.mean_cosine_aligned],
        color=["tab:red", "tab:green"],
    )
    right.set(
        ylim=(min(0.0, offline.drift.mean_cosine_unaligned), 1.0),
        ylabel="mean cosine v1 -> v2",
        title="Drift",
    )
    return figure


def _reads_figure(plt: Any, live: LiveResults) -> Any:
    figure, axis = plt.subplots(figsize=(9, 4))
    loads = [("idle", live.idle_reads)] + [(_label(r.offered_rate), r.reads) for r in live.rates]
    width = 0.8 / len(READ_TARGETS)
    for i, target in enumerate(READ_TARGETS):
        rows = [read_row(reads, target) for _, reads in loads]
        axis.bar(
            [x + i * width for x in range(len(loads))],
            [row.latency.p99_ms if row else 0.0 for row in rows],
            width,
            label=target,
        )
    axis.set_xticks([x + width for x in range(len(loads))], [name for name, _ in loads])
    axis.set(ylabel="p99 latency (ms)", yscale="log", title="Read p99, idle and under load")
    axis.legend()
    return figure
