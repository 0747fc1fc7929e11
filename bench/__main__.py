"""`python -m bench`: fedstream's transfer benchmark against its transport ceilings.

    python -m bench                                  the default grid
    python -m bench --params 100e6 --clients 4       one point
    python -m bench --params 100e6 --clients 4 8 --strategy fedavg median krum
                                                     robust aggregation at size
    python -m bench --params 100e6 --clients 4 --poll-status both
                                                     the point without, then with, its
                                                     status page read every second

For each point it prints, and writes to JSON (--out), seconds per round (median after
the first), bytes on the wire per round, effective throughput, and the peak resident
memory of the coordinator and of one client, beside three baselines measured in the same
run: raw loopback TCP, a bare grpcio stream and memory copy bandwidth. The headline is
effective throughput over the bare-grpcio baseline.

Points up to FLOOR_MAX_PARAMS also measure the two floors of `bench.floors` right after
them: the same round with no fedstream code (transport only, and the work the architecture
requires done by hand), so the table shows how close fedstream comes to what its
architecture allows on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import psutil

from bench.baselines import measure
from bench.floors import round_throughput
from bench.point import MIB, PointSpec, run_point

BLOCK_BYTES = 1 << 20
"""The block of each update a robust strategy reads at a time (server/spool.py's
BLOCK_BYTES; the bench does not import the server, see bench/point.py)."""
HOLDING_STRATEGIES = ("median", "trimmed-mean", "krum", "geomedian")
"""Strategies that read every update of the round in lockstep, a block of each at a time."""

DEFAULT_PARAMS = (10_000_000, 100_000_000, 1_000_000_000)
DEFAULT_CLIENTS = (2, 4, 8)
HEADROOM_BYTES = 2 << 30
"""Memory kept free beyond the estimate when deciding whether a point fits."""
FLOOR_MAX_PARAMS = 250_000_000
"""Larger points skip the floors: each would take minutes a round for a figure the
smaller points already give."""


def estimated_peak_bytes(params: int, clients: int) -> int:
    """Resident memory a point needs: the coordinator holds the model and its float32 sum,
    each client the model it trains (the downloaded global copy stays on disk), and every
    process about 400 MB of Python, torch and grpc."""
    model = 4 * params
    return 2 * model + clients * model + (clients + 1) * 400 * MIB


def coordinator_budget_bytes(model_bytes: int, clients: int, strategy: str) -> int:
    """The coordinator's memory target: the model, its aggregate (or a robust strategy's
    output), and 300 MB of runtime; a robust strategy also holds a block of every update."""
    blocks = clients * BLOCK_BYTES if strategy in HOLDING_STRATEGIES else 0
    return 2 * model_bytes + blocks + 300_000_000


def fits(params: int, clients: int) -> str | None:
    """Why a point cannot run on this machine, or None when it can."""
    need = estimated_peak_bytes(params, clients)
    have = psutil.virtual_memory().total - HEADROOM_BYTES
    if need > have:
        return f"needs about {need / 2**30:.0f} GiB, this machine has {have / 2**30:.0f} to give"
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def print_table(baselines: dict[str, float], results: list[dict[str, Any]]) -> None:
    grpc_bps, tcp_bps = baselines["grpc_Bps"], baselines["tcp_Bps"]
    print(
        f"baselines: raw TCP {_gb(tcp_bps)} GB/s, bare grpcio {_gb(grpc_bps)} GB/s, "
        f"memcpy {_gb(baselines['memcpy_Bps'])} GB/s"
    )
    uploads = [
        f"N={key.split('_')[2]} {_gb(value)}"
        for key, value in baselines.items()
        if key.startswith("grpc_upload_")
    ]
    if uploads:
        print(f"bare grpcio, N uploads at once into one server (GB/s): {', '.join(uploads)}")
    header = (
        f"{'params':>8} {'N':>3} {'strategy':>12} {'s/round':>8} {'wire GB':>8} {'GB/s':>6} "
        f"{'/grpc':>6} {'/tcp':>6} {'coord MiB':>9} {'budget':>7} {'client MiB':>10} "
        f"{'bare rnd':>8} {'design':>7} {'/design':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if "skipped" in r:
            print(
                f"{r['params'] / 1e6:>7.0f}M {r['clients']:>3} {r['strategy']:>12}  "
                f"skipped: {r['skipped']}"
            )
            continue
        polled = "*" if r.get("status_polls") else " "
        print(
            f"{r['params'] / 1e6:>7.0f}M{polled}{r['clients']:>3} {r['strategy']:>12} "
            f"{r['seconds_per_round']:>8.2f} "
            f"{_gb(r['wire_bytes_per_round']):>8} {_gb(r['throughput_Bps']):>6} "
            f"{r['throughput_Bps'] / grpc_bps:>6.2f} {r['throughput_Bps'] / tcp_bps:>6.2f} "
            f"{r['coordinator_peak_rss_bytes'] / 2**20:>9.0f} "
            f"{r['coordinator_budget_bytes'] / 2**20:>7.0f} "
            f"{r['client_peak_rss_bytes'] / 2**20:>10.0f} {_floors(r)}"
        )
    print(
        "bare rnd: GB/s of the same round through bare grpcio with no other work; design:"
        " with the work the architecture requires done by hand (bench/floors.py); /design:"
        " fedstream's GB/s over it; *: the status page polled every second"
    )


def _floors(result: dict[str, Any]) -> str:
    if "floor_design_Bps" not in result:
        return f"{'-':>8} {'-':>7} {'-':>7}"
    design = result["floor_design_Bps"]
    return (
        f"{_gb(result['floor_bare_Bps']):>8} {_gb(design):>7} "
        f"{result['throughput_Bps'] / design:>7.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--params", type=float, nargs="+", default=DEFAULT_PARAMS, help="model sizes"
    )
    parser.add_argument("--clients", type=int, nargs="+", default=DEFAULT_CLIENTS)
    parser.add_argument(
        "--strategy",
        nargs="+",
        default=["fedavg"],
        help="the coordinator's --strategy, each point once per strategy; krum runs with "
        "the largest f its N allows, (N-3)/2, so that Krum itself runs, not its fallback",
    )
    parser.add_argument(
        "--floors",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"measure the floors of bench.floors after points up to {FLOOR_MAX_PARAMS:,} params",
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds per point (>= 2)")
    parser.add_argument("--chunk-mib", type=int, default=1, help="chunk size in MiB")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/results.json"))
    parser.add_argument(
        "--poll-status",
        choices=("off", "on", "both"),
        default="off",
        help="read each point's status page (/status.json, /metrics) every second; "
        "both: run each point without, then with, back to back",
    )
    args = parser.parse_args()
    chunk = args.chunk_mib * MIB
    cpus = psutil.cpu_count() or 1
    started = time.time()
    print(f"measuring baselines ({chunk // MIB} MiB messages) ...", flush=True)
    baselines = measure(chunk, args.clients)
    results: list[dict[str, Any]] = []
    polls = {"off": [False], "on": [True], "both": [False, True]}[args.poll_status]
    points = [
        (int(p), n, strategy, poll)
        for p in args.params
        for n in args.clients
        for strategy in args.strategy
        for poll in polls
    ]
    for params, clients, strategy, poll in points:
        reason = fits(params, clients)
        if reason is not None:
            results.append(
                {"params": params, "clients": clients, "strategy": strategy, "skipped": reason}
            )
            print(f"P={params:,} N={clients} {strategy}: skipped ({reason})", flush=True)
            continue
        watched = ", status page polled" if poll else ""
        print(f"P={params:,} N={clients} {strategy}: {args.rounds} rounds{watched} ...", flush=True)
        spec = PointSpec(params, clients, args.rounds, chunk, strategy=strategy, poll_status=poll)
        result = run_point(spec, args.work_dir).as_dict()
        result["vs_grpc"] = result["throughput_Bps"] / baselines["grpc_Bps"]
        result["vs_tcp"] = result["throughput_Bps"] / baselines["tcp_Bps"]
        result["coordinator_budget_bytes"] = coordinator_budget_bytes(
            result["model_bytes"], clients, strategy
        )
        # The floors measure the transfer, which no strategy changes: once a point.
        first = strategy == args.strategy[0] and not poll
        if args.floors and params <= FLOOR_MAX_PARAMS and first:
            model_bytes = result["model_bytes"]
            for work in ("bare", "design"):
                result[f"floor_{work}_Bps"] = round_throughput(
                    work, model_bytes, clients, args.rounds, chunk
                )
        results.append(result)
        print(json.dumps(result), flush=True)
    print()
    print_table(baselines, results)
    report = {
        "machine": {
            "cpus": cpus,
            "memory_bytes": psutil.virtual_memory().total,
            "python": platform.python_version(),
        },
        "started": started,
        "chunk_bytes": chunk,
        "baselines": baselines,
        "points": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
