"""docs/report.md and the raw numbers as JSON, from one evaluation run (plots: plots.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.evaluation.live_results import (
    MOCK_BROKER,
    READ_TARGETS,
    LiveResults,
    ReadRow,
    read_row,
)
from service.evaluation.offline import OfflineResults
from service.evaluation.plots import render_plots

ASSETS = "report"  # plots and JSON go to <out>/report/, next to <out>/report.md


@dataclass(frozen=True, slots=True)
class EvaluationResults:
    commit: str
    started_at: str  # ISO 8601, UTC
    preset: str
    command: str
    machine: dict[str, str | int]
    live: LiveResults | None
    offline: OfflineResults | None
    seconds: float


def write_report(results: EvaluationResults, out_dir: Path) -> Path:
    """Write report.md, report/*.png and report/report.json under ``out_dir``; return the
    path of report.md."""
    assets = out_dir / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    raw = _finite(asdict(results))
    (assets / "report.json").write_text(json.dumps(raw, indent=1, allow_nan=False) + "\n")
    plots = render_plots(results.live, results.offline, assets, ASSETS)
    path = out_dir / "report.md"
    path.write_text(render_markdown(results, plots))
    return path


def _finite(value: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# -- markdown ------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(value: float) -> str:
    return (
        "n/a" if not math.isfinite(value) else f"{value:,.1f}" if value >= 100 else f"{value:.2f}"
    )


def _num(value: float, digits: int = 4) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _sentence(clause: str) -> str:
    return clause[:1].upper() + clause[1:]


def _rate(value: float) -> str:
    return f"{round(value):,}"  # an int: -0.2 prints as 0, not -0


def render_markdown(results: EvaluationResults, plots: dict[str, str]) -> str:
    parts = [
        "# userembed evaluation report",
        "",
        f"Measured on commit `{results.commit}` at {results.started_at}, preset "
        f"`{results.preset}`, on {results.machine.get('cpus')} CPUs "
        f"({results.machine.get('processor')}, Python {results.machine.get('python')}); "
        f"the run took {results.seconds / 60:.1f} min. Reproduce with `{results.command}`; "
        f"the raw numbers are in [{ASSETS}/report.json]({ASSETS}/report.json).",
        "",
        "Everything ran on this one machine: the Kafka-protocol broker, Redis, ingest, the "
        "worker, the API and the load generators share its cores, so the latencies include "
        "that contention. Sections 1 and 5 measure the running pipeline in real time; "
        "sections 2-4 replay the synthetic world in simulated time through the same code "
        "(`apply_events` -> `assemble` -> the served ONNX model -> `stabilize`).",
        "",
        "## Summary",
        "",
        *_summary(results),
    ]
    if results.live is not None:
        parts += _freshness_section(results.live, plots)
    if results.offline is not None:
        parts += _value_section(results.offline, plots)
        parts += _stabilization_section(results.offline, plots)
        parts += _retrain_section(results.offline, plots)
    if results.live is not None:
        parts += _reads_section(results.live, plots)
    return "\n".join(parts) + "\n"


def _summary(results: EvaluationResults) -> list[str]:
    lines: list[str] = []
    live, offline = results.live, results.offline
    if live is not None:
        fresh = ", ".join(
            f"{_rate(r.offered_rate)} ev/s: p50 {_ms(r.probes.p50_ms)} / p99 "
            f"{_ms(r.probes.p99_ms)} ms{'' if r.keeps_up else ' (not keeping up)'}"
            for r in live.rates
        )
        lines.append(
            f"- **Freshness** (event produced -> embedding served): {fresh}. "
            f"{_sentence(live.saturation)}."
        )
    if offline is not None:
        f = offline.freshness
        lines.append(
            f"- **Value of freshness**: the frozen ranker's click AUC is {_num(f[0].auc)} with "
            f"fresh embeddings and {_num(f[-1].auc)} with embeddings {f[-1].label} stale "
            f"(NE {_num(f[0].ne)} -> {_num(f[-1].ne)}); without any user embedding it is "
            f"{_num(offline.no_user_embedding.auc)}."
        )
        off = offline.stabilization[0]
        on = [s for s in offline.stabilization[1:] if s.time_constant_s == 60.0]
        chosen = on[0] if on else offline.stabilization[-1]
        lines.append(
            f"- **Stabilization** ({chosen.name}): jitter between consecutive serves "
            f"{_num(off.jitter_mean)} -> {_num(chosen.jitter_mean)} (1 - cosine, mean), "
            f"ranker AUC {_num(off.auc)} -> {_num(chosen.auc)}."
        )
        r = offline.retrain
        lines.append(
            f"- **Retrains**: the v1 ranker scores AUC {_num(r[1].auc)} on v2 embeddings "
            f"unaligned, {_num(r[2].auc)} aligned, against {_num(r[0].auc)} on v1 and "
            f"{_num(r[3].auc)} for a ranker retrained on v2; mean cosine v1 -> v2 "
            f"{_num(offline.drift.mean_cosine_unaligned, 3)} unaligned, "
            f"{_num(offline.drift.mean_cosine_aligned, 3)} aligned; {_recovery(offline)}."
        )
    if live is not None and live.idle_reads and live.rates:
        # the busiest rate the pipeline sustains (else the lowest measured)
        kept = [r for r in live.rates if r.keeps_up]
        busiest = kept[-1] if kept else live.rates[0]
        changes = []
        for target in READ_TARGETS:
            idle, loaded = read_row(live.idle_reads, target), read_row(busiest.reads, target)
            if idle is not None and loaded is not None:
                p99 = f"{_ms(idle.latency.p99_ms)} -> {_ms(loaded.latency.p99_ms)} ms"
                changes.append(f"{target} {p99}")
        lines.append(
            f"- **Reads** (open loop, {_rate(live.config['read_rate'])} req/s), p99 idle -> "
            f"with {_rate(busiest.offered_rate)} events/s flowing: {', '.join(changes)} "
            "(the raw Redis GET is the baseline: what the shared cores cost any reader)."
        )
    return lines or ["- (no section was run)"]


def _image(plots: dict[str, str], name: str, alt: str) -> list[str]:
    return ["", f"![{alt}]({plots[name]})"] if name in plots else []


def _freshness_section(live: LiveResults, plots: dict[str, str]) -> list[str]:
    c = live.config
    rows = [
        (
            _rate(r.offered_rate),
            _rate(r.produced_rate),
            _rate(r.ingested_rate),
            _rate(r.embedded_rate),
            r.probes.count,
            _ms(r.probes.p50_ms),
            _ms(r.probes.p99_ms),
            _ms(r.probes.p999_ms),
            _ms(r.probes.max_ms),
            r.probe_timeouts,
            _rate(r.queue_growth_per_s),
            r.queue_depth_end,
            _ms(float(r.oldest_dirty_age_median_ms)),
            _rate(r.kafka_lag_growth_per_s),
            r.kafka_lag_end,
            "yes" if r.keeps_up else "**no**: " + "; ".join(r.shortfalls),
        )
        for r in live.rates
    ]
    return [
        "",
        "## 1. Freshness: event to served embedding",
        "",
        f"Configuration: broker {live.broker}, {live.kafka_partitions} partitions; "
        f"{c.get('users'):,} background users (Zipf activity, `userembed produce`); model "
        f"`{live.model_version}` on {live.worker_provider}; one ingest, one worker and one API "
        f"process. Per rate: {c.get('warmup_s')} s warm-up, then "
        f"{c.get('measure_s')} s of probes by {c.get('probe_users')} dedicated users. "
        f"Settings that differ from the defaults: {_overrides(live.settings_overrides)}.",
        "",
        "A probe produces one event for its user and polls the API (batchGet every "
        f"{c.get('probe_poll_ms')} ms) until the served `feature_version` includes it: the "
        "latency a ranker sees, from the producer to a served embedding. Throughputs are "
        "deltas of the roles' own Prometheus counters over the probe window.",
        "",
        _table(
            (
                "offered ev/s",
                "produced ev/s",
                "ingested ev/s",
                "embedded users/s",
                "probes",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "max ms",
                "timeouts",
                "queue growth users/s",
                "queue at end",
                "oldest dirty ms (median)",
                "Kafka lag growth ev/s",
                "Kafka lag at end",
                "keeps up",
            ),
            rows,
        ),
        "",
        f"**Where the queue stops keeping up:** {live.saturation}.",
        *(
            [
                "",
                "Past that rate the percentiles cover only the probes that were served. On "
                "librdkafka's mock cluster a partition that ingest falls far behind on is "
                "truncated (the mock keeps only a few MB per partition; ingest logs offset "
                "resets), so some events, probes included, are never delivered: a real Kafka "
                "keeps them by retention time and ingest would work through the lag instead.",
            ]
            if live.first_failing_rate is not None and live.broker == MOCK_BROKER
            else []
        ),
        *_image(plots, "freshness", "freshness latency and dirty queue per event rate"),
    ]


def _overrides(settings: dict[str, str]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in sorted(settings.items())) or "none"


def _value_section(offline: OfflineResults, plots: dict[str, str]) -> list[str]:
    w, fresh = offline.world, offline.freshness[0]
    rows = [
        (
            row.label,
            _num(row.auc),
            f"{row.auc - fresh.auc:+.4f}",
            _num(row.ne),
            f"{row.ne - fresh.ne:+.4f}",
            _num(row.mean_cosine_to_fresh, 3),
            f"{row.share_missing_events:.1%}",
        )
        for row in offline.freshness
    ]
    blind = offline.no_user_embedding
    rows.append(
        (
            blind.name,
            _num(blind.auc),
            f"{blind.auc - fresh.auc:+.4f}",
            _num(blind.ne),
            f"{blind.ne - fresh.ne:+.4f}",
            "",
            "",
        )
    )
    return [
        "",
        "## 2. The value of freshness",
        "",
        _world_line(offline),
        "",
        f"The ranker is trained on {offline.impressions['ranker_train']:,.0f} impressions "
        f"(days 2-{w['days'] - 1}) with fresh v1 embeddings, then frozen. It scores the "
        f"{offline.impressions['eval']:,.0f} impressions of the last day "
        f"({offline.impressions['eval_users']:,.0f} users, click rate "
        f"{offline.impressions['eval_click_rate']:.3f}) with the embedding each user would "
        "have been served had it last been computed that long before the impression.",
        "",
        _table(
            (
                "staleness",
                "click AUC",
                "Δ AUC",
                "NE",
                "Δ NE",
                "cosine to fresh",
                "impressions with missed events",
            ),
            rows,
        ),
        "",
        _precision_line(offline),
        *_image(plots, "value_of_freshness", "ranker AUC and NE against embedding staleness"),
    ]


def _precision_line(offline: OfflineResults) -> str:
    """How precise one AUC of these tables is, so small differences are read as such."""
    positives, negatives = offline.eval_clicks
    error = offline.auc_error(offline.freshness[0].auc)
    return (
        f"Precision: with {positives + negatives:,} impressions ({positives:,} clicks), one "
        f"AUC has a standard "
        f"error of about {error:.4f} (Hanley-McNeil); rows score the same impressions, so "
        "their differences are paired and somewhat more precise than that, but differences "
        "well below it are noise."
    )


def _world_line(offline: OfflineResults) -> str:
    w, c = offline.world, offline.config
    models = "; ".join(
        f"`{v}` held-out click AUC {m.get('click_auc', float('nan')):.4f}"
        for v, m in offline.models.items()
    )
    return (
        f"Configuration: synthetic world of {w['users']:,} users, {w['items']:,} items, "
        f"{w['days']} days (seed {w['seed']}); SUM models trained on the first 80% of "
        f"sessions ({models}); downstream ranker: item and category embeddings, the frozen "
        f"user embedding and their interaction into a small MLP, {c['ranker_epochs']} epochs."
    )


def _stabilization_section(offline: OfflineResults, plots: dict[str, str]) -> list[str]:
    s = offline.stabilization_settings
    rows = [
        (
            row.name,
            _num(row.jitter_mean),
            _num(row.jitter_p90),
            row.pairs,
            _num(row.auc),
            _num(row.ne),
            _num(row.mean_cosine_to_fresh, 3),
        )
        for row in offline.stabilization
    ]
    return [
        "",
        "## 3. Stabilization within a model version",
        "",
        "Each user's impressions of the last day are served in order, each from the "
        "embedding computed fresh just before it; with stabilization on, the served vector "
        "moves from the previous serve towards the fresh one as the worker does it "
        f"(`service/core/stabilization.py`, min weight {s['min_weight']}, max step "
        f"{s['max_step']} rad; docs/stabilization.md). Jitter is 1 - cosine between "
        "consecutive serves of a user; the frozen ranker (trained on raw embeddings) scores "
        "the served vectors.",
        "",
        _table(
            (
                "stabilization",
                "jitter mean",
                "jitter p90",
                "pairs",
                "click AUC",
                "NE",
                "cosine to fresh",
            ),
            rows,
        ),
        "",
        _precision_line(offline),
        *_image(plots, "stabilization", "jitter against ranker AUC per stabilization setting"),
    ]


def _retrain_section(offline: OfflineResults, plots: dict[str, str]) -> list[str]:
    d = offline.drift
    return [
        "",
        "## 4. Stabilization across retrains",
        "",
        "v2 is a retrain of v1 on the same data with another seed. The registry fitted its "
        f"orthogonal Procrustes map onto v1 on {d.fit_sample_size:,} recent users (mean "
        f"cosine {d.fit_mean_cosine_before:.3f} -> {d.fit_mean_cosine_after:.3f} on that "
        "sample); the worker serves v2 through it. Scored on the same held-out impressions "
        "as section 2, fresh embeddings.",
        "",
        _table(
            ("embeddings and ranker", "click AUC", "NE"),
            [(r.name, _num(r.auc), _num(r.ne)) for r in offline.retrain],
        ),
        "",
        _table(
            ("drift v1 -> v2 (same impressions)", "mean cosine"),
            [
                ("unaligned", _num(d.mean_cosine_unaligned, 3)),
                ("aligned (Procrustes)", _num(d.mean_cosine_aligned, 3)),
            ],
        ),
        "",
        _precision_line(offline),
        "",
        _recovery_line(offline),
        *_image(plots, "retrain", "ranker AUC across a retrain"),
    ]


def _errors(kinds: dict[str, int]) -> str:
    """``0``, or the count with its kinds: ``130 (ConnectionError 128, timeout 2)``."""
    if not kinds:
        return "0"
    detail = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items(), key=lambda k: -k[1]))
    return f"{sum(kinds.values())} ({detail})"


def _recovery(offline: OfflineResults) -> str:
    """How much of the AUC the frozen v1 ranker loses on unaligned v2 alignment wins back."""
    reference, unaligned, aligned, _ = (r.auc for r in offline.retrain)
    lost = reference - unaligned
    if lost <= 0:
        return "the frozen v1 ranker loses no AUC on unaligned v2, so alignment has nothing to win"
    return (
        f"alignment wins back {(aligned - unaligned) / lost:.0%} of the AUC the frozen v1 "
        "ranker loses on unaligned v2"
    )


def _recovery_line(offline: OfflineResults) -> str:
    _, unaligned, aligned, retrained = offline.retrain
    gap, error = aligned.auc - retrained.auc, offline.auc_error(retrained.auc)
    verdict = (
        ": within the noise, so a downstream model keeps working across the retrain "
        "without being retrained itself"
        if abs(gap) < 2 * error
        else ""
    )
    return (
        f"{_sentence(_recovery(offline))} ({_num(unaligned.auc)} -> {_num(aligned.auc)}). The "
        f"aligned row is {gap:+.4f} from the ranker retrained on v2, "
        f"{abs(gap) / error:.1f} standard errors{verdict}."
    )


def _reads_section(live: LiveResults, plots: dict[str, str]) -> list[str]:
    c = live.config

    def rows_of(label: str, reads: Sequence[ReadRow]) -> list[tuple[object, ...]]:
        return [
            (
                label,
                r.target,
                _rate(r.rate),
                _rate(r.achieved_rate),
                _errors(r.errors),
                r.latency.count,
                _ms(r.latency.p50_ms),
                _ms(r.latency.p99_ms),
                _ms(r.latency.p999_ms),
            )
            for r in reads
        ]

    rows = rows_of("idle", live.idle_reads)
    for rate in live.rates:
        rows += rows_of(f"{_rate(rate.offered_rate)} ev/s", rate.reads)
    return [
        "",
        "## 5. Read latency under ingest and worker load",
        "",
        f"Open-loop reads at {_rate(float(c.get('read_rate', 0)))} req/s for "
        f"{c.get('read_s')} s per target (latency from the scheduled send time, so queueing "
        "in the client counts), uniform over the background users: the API over HTTP "
        "(GET, keep-alive) and gRPC (GetEmbedding), and a raw Redis GET of the same record "
        "as the baseline. Idle: the pipeline is up but no events flow; then at each rate of "
        "section 1, after its probe window, with the producer still running. An error is a "
        f"failed read or one not answered within {c.get('read_timeout_s')} s.",
        "",
        _table(
            (
                "load",
                "target",
                "offered req/s",
                "achieved req/s",
                "errors",
                "requests",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
            ),
            rows,
        ),
        *_image(plots, "reads", "read latency idle and under load"),
    ]
