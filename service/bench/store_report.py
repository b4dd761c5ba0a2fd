"""The store benchmark's report: tables, cluster/single ratios and projections to N
primaries, from the measured rows alone (no Redis), so the output changes apart from the run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from service.bench.store_probes import Topology
from service.bench.store_rows import MemoryRow, OpRow, StoreBenchConfig, StoreBenchResult

_HEAD: Final = (
    "{:<21} {:<9} {:<10} {:>4} {:>10} {:>8} {:>8} {:>8} {:>6} {:>7} {:>8} {:>8} {:>8} {:>6} {:>6}"
)
_TOPOLOGY_ORDER: Final = {"single": 0, "cluster": 1, "raw-single": 2}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith("ch") else "s")


def _print_ops(title: str, rows: Sequence[OpRow]) -> None:
    print(f"\n== {title}")
    print(
        _HEAD.format(
            "op",
            "unit",
            "topology",
            "conc",
            "units/s",
            "µs/unit",
            "p50 µs",
            "p99 µs",
            "req/op",
            "cmds/op",
            "srv µs/u",
            "rep µs/u",
            "cli µs/u",
            "c/s",
            "c/s",
        )
    )
    print(_HEAD.format(*[""] * 13, "rate", "srv/u"))
    singles = {(r.op, r.concurrency): r for r in rows if r.topology == "single"}
    ops = list(dict.fromkeys(r.op for r in rows))
    ordered = sorted(
        rows, key=lambda r: (ops.index(r.op), r.concurrency, _TOPOLOGY_ORDER[r.topology])
    )
    for r in ordered:
        base = singles.get((r.op, r.concurrency)) if r.topology == "cluster" else None
        print(
            _HEAD.format(
                r.op,
                r.unit,
                r.topology,
                r.concurrency,
                f"{r.units_per_s:,.0f}" + ("*" if r.exhausted else ""),
                f"{r.us_per_unit:.2f}",
                f"{r.p50_us:,.0f}",
                f"{r.p99_us:,.0f}",
                f"{r.requests_per_op:.1f}",
                f"{r.commands_per_op:,.0f}",
                f"{r.server_us_per_unit:.2f}",
                f"{r.replica_us_per_unit:.2f}" if r.topology == "cluster" else "-",
                f"{r.client_us_per_unit:.2f}",
                _ratio(r.units_per_s, base.units_per_s) if base else "",
                _ratio(r.server_us_per_unit, base.server_us_per_unit) if base else "",
            )
        )
    for r in ordered:
        if r.exhausted:
            print(f"  * {r.op} on {r.topology}: the queue ran empty after {r.seconds:.2f} s")
        if r.refills:
            print(
                f"  {r.op} on {r.topology}: queue refilled {r.refills}x outside the window "
                f"({r.units:,} {_plural(r.unit)} in {r.seconds:.2f} s)"
            )


def _projection(rows: Sequence[OpRow], op: str, concurrency: int, what: str) -> str:
    by = {r.topology: r for r in rows if r.op == op and r.concurrency == concurrency}
    single, cluster = by.get("single"), by.get("cluster")
    if single is None or cluster is None or cluster.server_us_per_unit <= 0:
        return f"{what}: not enough data to project"
    per_primary = 1e6 / cluster.server_us_per_unit
    cap = 1e6 / single.server_us_per_unit if single.server_us_per_unit > 0 else float("nan")
    even = _ratio(cluster.server_us_per_unit, single.server_us_per_unit)
    return (
        f"{what}: cluster {_plural(cluster.unit)}/s ~= N x {per_primary:,.0f} "
        f"(= 1e6 / {cluster.server_us_per_unit:.2f} µs of primary CPU per {cluster.unit}, "
        f"shards spread over N primaries, one core each); one node caps at {cap:,.0f}/s, "
        f"so N > {even} primaries beat it; clients: {cluster.client_us_per_unit:.1f} µs "
        f"CPU per {cluster.unit} on a cluster ({1e6 / cluster.client_us_per_unit:,.0f}/s per "
        f"client core)"
    )


def _claim_projection(rows: Sequence[OpRow], shards: int) -> str:
    by = {(r.topology, r.op.rsplit("S=", 1)[1]): r for r in rows}
    lines = []
    for topology in ("single", "cluster"):
        many, one = by.get((topology, str(shards))), by.get((topology, "1"))
        if many and one and many.server_us_per_unit > 0 and one.server_us_per_unit > 0:
            lines.append(
                f"{topology}: one queue key caps at {1e6 / one.server_us_per_unit:,.0f} users/s "
                f"(one core, any N); S={shards} shards: ~min(N, S) x "
                f"{1e6 / many.server_us_per_unit:,.0f} users/s"
            )
    return "claims: " + "; ".join(lines) if lines else "claims: not enough data to project"


def _print_memory(rows: Sequence[MemoryRow], memkeys: Sequence[str], shards: int) -> list[str]:
    print("\n== bytes per user (used_memory delta less buffers / users; MEMORY USAGE per kind)")
    head = "{:<8} {:>4} {:<8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>8} {:>8} {:>6}"
    print(
        head.format(
            "topology",
            "hist",
            "dtype",
            "B/user",
            "+replica",
            "feature",
            "embed",
            "dirty",
            "active",
            "lease*",
            "payload",
            "other",
            "c/s",
        )
    )
    singles = {(r.history, r.dtype): r for r in rows if r.topology == "single"}
    for r in rows:
        parts = r.feature_bytes + r.embedding_bytes + r.dirty_entry_bytes + r.active_entry_bytes
        base = singles.get((r.history, r.dtype)) if r.topology == "cluster" else None
        print(
            head.format(
                r.topology,
                r.history,
                r.dtype,
                f"{r.bytes_per_user:,.0f}",
                f"{r.replica_bytes_per_user:,.0f}" if r.topology == "cluster" else "-",
                f"{r.feature_bytes:,.0f}",
                f"{r.embedding_bytes:,.0f}",
                f"{r.dirty_entry_bytes:,.0f}",
                f"{r.active_entry_bytes:,.0f}",
                f"{r.lease_entry_bytes:,.0f}",
                f"{r.feature_payload + r.embedding_payload:,.0f}",
                f"{r.bytes_per_user - parts:,.0f}",
                _ratio(r.bytes_per_user, base.bytes_per_user) if base else "",
            )
        )
    print(
        "  feature/embed: MEMORY USAGE of a sample of keys (key, value, dict entry); "
        "dirty/active: per member of the shard zsets; lease*: per claimed user, only while "
        "claimed; payload: the encoded records; other: the rest of the delta "
        "(hash-table buckets, on a cluster the slot index)"
    )
    if memkeys:
        print("  redis-cli --memkeys on the single node (its last load):")
        for line in memkeys:
            print(f"    {line}")
    lines = []
    default = next((r for r in rows if r.topology == "cluster"), None) or (
        rows[0] if rows else None
    )
    if default is not None:
        per_gib = 2**30 / default.bytes_per_user
        total_tib = 1e9 * (default.bytes_per_user + default.replica_bytes_per_user) / 2**40
        zset_mb = 1e9 / shards * default.active_entry_bytes / 1e6
        lines.append(
            f"memory ({default.topology}, history {default.history}, {default.dtype}): "
            f"{per_gib * 100 / 1e6:,.0f} M users per 100 GiB of primary memory; 1 B users "
            f"~= {total_tib:.2f} TiB with one replica each; the biggest keys are the per-shard "
            f"zsets: at 1 B users and S={shards} each active/dirty zset holds {1e9 / shards:,.0f} "
            f"members (~{zset_mb:,.0f} MB, moved whole when its slot migrates): "
            f"more shards keep them small"
        )
    return lines


def print_header(config: StoreBenchConfig, provenance: dict[str, Any], cluster: Topology) -> None:
    m = provenance["machine"]
    idle = provenance["idle_cpu_ms_per_s"]
    nodes = len(cluster.primaries) + len(cluster.replicas)
    print(
        f"userembed bench store  commit={provenance['commit']}  python={m['python']}  "
        f"cpus={m['cpus']}  {m['processor']}  {m['platform']}  redis={provenance['redis']}"
    )
    print(
        f"users={config.users:,}  events={config.events:,}  seconds={config.seconds}  "
        f"shards={config.shards}  single: 1 redis-server; cluster: {len(cluster.primaries)} "
        f"primaries + {len(cluster.replicas)} replicas, same RedisStore code"
    )
    print(
        f"idle Redis CPU subtracted: single {idle['single']:.1f} ms/s, cluster primaries "
        f"{idle['cluster_primaries']:.1f} ms/s, replicas {idle['cluster_replicas']:.1f} ms/s"
    )
    print(
        f"note: on this {m['cpus']}-core machine the {nodes}"
        " cluster processes share the cores with the client, so the cluster is not faster here:"
        " read the server CPU per unit (srv µs/u) and the projections"
    )
    print(
        "columns: req/op = Redis round trips per operation: requests the client wrote (a "
        "command or a pipeline to one node; on a cluster those to different nodes go out "
        "concurrently); cmds/op = commands Redis ran (INFO commandstats, incl. inside scripts); "
        "srv/rep/cli µs/u = CPU per unit of primaries / replicas / this client; "
        "c/s = cluster / single"
    )


def print_result(config: StoreBenchConfig, result: StoreBenchResult) -> None:
    sections = {
        "ingest": f"1. ingest: FeatureUpdater.apply of {config.ingest_batch}-event batches "
        "(get_features + compare-and-set put_features), users with a full history",
        "worker": "2. worker store ops: claim_dirty + get_features_and_embeddings + "
        "write_and_release (random records, no model)",
        "read": "3. reads: get_embeddings, next to plain redis-py GET/MGET on the single node",
        "claim": f"4. claims: claim_dirty({config.worker_batch}) with S={config.shards} shards "
        f"vs one queue key (S=1), {config.claim_concurrency} concurrent claimers",
    }
    for section, title in sections.items():
        _print_ops(title, [r for r in result.ops if r.section == section])
        rows = [r for r in result.ops if r.section == section]
        if section == "read":
            for r in rows:
                if r.topology != "raw-single":
                    continue
                store = next(
                    s
                    for s in rows
                    if (s.op, s.concurrency, s.topology) == (r.op, r.concurrency, "single")
                )
                print(
                    f"  single store / raw redis-py, {r.op} c={r.concurrency}: "
                    f"p50 x{_ratio(store.p50_us, r.p50_us)}, "
                    f"rate x{_ratio(store.units_per_s, r.units_per_s)}"
                )
    ops = result.ops
    result.projections.extend(
        [
            _projection(ops, f"apply b{min(config.ingest_batch, config.events)}", 1, "ingest"),
            _projection(ops, f"claim+read+write b{config.worker_batch}", 1, "worker"),
            _projection(ops, "get 1", config.concurrency, "single reads"),
            _projection(ops, f"get {config.read_batch}", config.concurrency, "batch reads"),
            _claim_projection([r for r in ops if r.section == "claim"], config.shards),
        ]
    )
    result.projections.extend(_print_memory(result.memory, result.memkeys, config.shards))
    print("\n== projection for N primaries (server-bound; measured per-op cost)")
    for line in result.projections:
        print(f"- {line}")
