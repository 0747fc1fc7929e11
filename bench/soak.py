"""The soak (issue #24): many rounds of real processes under kills and cut connections.

    python -m bench.soak [--rounds 60] [--seed 0] [--client-kills 12]
                         [--coordinator-kills 3] [--cuts 20] [--out runs/soak]

digits, 5 clients and a coordinator as `fedstream` processes on loopback, the clients
behind the tests' fault proxy. Disturbances drawn from the seed (bench/soak_plan.py):
`kill -9` of clients (started again with the same identity after a short pause), of the
coordinator (started again on the same run directory and port), and connections cut by
the proxy. Then the same run undisturbed, the twin. Checks, each printed and in
OUT/soak.json and OUT/soak.md: every round accounted for (bench/soak_ledger.py), the
coordinator's memory at round 50 within 5% of round 5 (one coordinator life), the final
model finite and its held-out accuracy within 1 point of the twin's. Exits 1 when a check
fails. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

from bench.robust_cluster import checkpoint_finite
from bench.soak_cluster import Outcome, Shape, Soak
from bench.soak_ledger import account, memory, parse, totals
from bench.soak_plan import CUT, KILL_CLIENT, KILL_COORDINATOR, PlanShape, make_plan
from bench.soak_report import markdown


def final(records: list[dict[str, Any]], key: str) -> float:
    """The last round's `key` (eval_accuracy, eval_loss); NaN when no round has it."""
    scored = [r[key] for r in records if isinstance(r.get(key), float)]
    return float(scored[-1]) if scored else math.nan


def run_both(args: argparse.Namespace) -> dict[str, Any]:
    shape = PlanShape(
        rounds=args.rounds,
        clients=args.clients,
        client_kills=args.client_kills,
        coordinator_kills=args.coordinator_kills,
        cuts=args.cuts,
        memory_rounds=tuple(args.memory_rounds),  # type: ignore[arg-type]
    )
    plan = make_plan(shape, args.seed)
    run = Shape(args.rounds, args.clients, args.seed, args.timeout, args.hidden)
    protect = (args.memory_rounds[0], args.memory_rounds[1])
    shutil.rmtree(args.out / "soak-run", ignore_errors=True)
    shutil.rmtree(args.out / "twin-run", ignore_errors=True)
    print(f"soak: {args.rounds} rounds, {len(plan)} disturbances planned", flush=True)
    soak = Soak(run, plan, protect, args.out / "soak-run").run()
    print(f"soak: done in {soak.seconds:.0f}s", flush=True)
    if soak.aborted:
        print(f"soak: aborted ({soak.aborted}); no twin", flush=True)
        twin = Outcome([], [], [], [], {}, 0, 0.0)
    else:
        print("twin: the same run undisturbed", flush=True)
        twin = Soak(run, [], protect, args.out / "twin-run").run()
        print(f"twin: done in {twin.seconds:.0f}s", flush=True)
    return judge(args, [d.as_dict() for d in plan], soak, twin)


def judge(
    args: argparse.Namespace, plan: list[dict[str, Any]], soak: Outcome, twin: Outcome
) -> dict[str, Any]:
    accounts = account(soak.records, args.rounds, parse(soak.lines), soak.fired)
    sums = totals(accounts)
    first, last = args.memory_rounds
    mem = memory(soak.rss, first, last, args.memory_tolerance)
    twin_mem = memory(twin.rss, first, last, args.memory_tolerance)
    finite = checkpoint_finite(args.out / "soak-run" / "run")
    accuracy, twin_accuracy = (
        final(soak.records, "eval_accuracy"),
        final(twin.records, "eval_accuracy"),
    )
    gap = abs(accuracy - twin_accuracy) * 100
    rounds_done = sorted(int(r["round"]) for r in soak.records if r.get("round"))
    fired = {
        kind: sum(f.kind == kind for f in soak.fired)
        for kind in (KILL_CLIENT, KILL_COORDINATOR, CUT)
    }
    asked = {
        KILL_CLIENT: args.client_kills,
        KILL_COORDINATOR: args.coordinator_kills,
        CUT: args.cuts,
    }
    checks = {
        "rounds": {
            "ok": rounds_done == list(range(1, args.rounds + 1))
            and all(code == 0 for code in soak.exit_codes.values()),
            "recorded": len(rounds_done),
            "aborted": soak.aborted,
            "exit_codes": soak.exit_codes,
        },
        "accounting": {"ok": sums["problems"] == 0, **sums},
        "memory": mem,
        "model": {
            "ok": bool(finite) and gap <= args.accuracy_points,
            "finite": finite,
            "accuracy": accuracy,
            "twin_accuracy": twin_accuracy,
            "loss": final(soak.records, "eval_loss"),
            "twin_loss": final(twin.records, "eval_loss"),
            "gap_points": round(gap, 2),
            "allowed_points": args.accuracy_points,
        },
        "disturbed": {
            "ok": all(fired[k] > 0 for k, n in asked.items() if n > 0),
            "fired": fired,
            "planned": asked,
            "skipped": soak.skipped,
        },
    }
    if args.expect_round_log:
        checks["round_log"] = {
            "ok": sums["retrained_after_restart"] == 0,
            "retrained_after_restart": sums["retrained_after_restart"],
        }
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "ok": all(c["ok"] for c in checks.values()),
        "checks": checks,
        "twin": {
            "seconds": round(twin.seconds, 1),
            "memory": twin_mem,
            "exit_codes": twin.exit_codes,
        },
        "seconds": round(soak.seconds, 1),
        "rss": soak.rss,
        "plan": plan,
        "fired": [vars(f) for f in soak.fired],
        "rounds": [vars(acc) for acc in accounts],
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The figures the soak prints, one line a check."""
    c = result["checks"]
    acc, mem, model, dist = c["accounting"], c["memory"], c["model"], c["disturbed"]
    mark = {True: "ok  ", False: "FAIL"}
    lines = [
        f"{mark[c['rounds']['ok']]} rounds: {c['rounds']['recorded']} of "
        f"{result['settings']['rounds']} recorded; exit codes {c['rounds']['exit_codes']}"
        f"{'; aborted: ' + c['rounds']['aborted'] if c['rounds']['aborted'] else ''}",
        f"{mark[acc['ok']]} accounting: {acc['updates']} updates, "
        f"{acc['uploaded_in_committing_life']} uploaded in the committing life, "
        f"{acc['from_log']} from the round's log, {acc['missing_updates']} missing; "
        f"{acc['trainings']} trainings, asked again "
        f"{acc['asked_again'] or 'never'}; {acc['retrained_after_restart']} acknowledged "
        f"updates trained again after a coordinator restart; {acc['problems']} problems",
        f"{mark[dist['ok']]} disturbances: fired {dist['fired']} of planned "
        f"{dist['planned']}; {len(dist['skipped'])} skipped",
    ]
    if "first_mib" in mem:
        lines.append(
            f"{mark[mem['ok']]} memory: coordinator RSS {mem['first_mib']} MiB at round "
            f"{mem['first_round']}, {mem['last_mib']} MiB at round {mem['last_round']} "
            f"({mem['change']:+.1%}, life {mem['life']}"
            f"{'' if mem['same_life_as_asked'] else ', not the rounds asked'})"
        )
    else:
        lines.append(f"{mark[mem['ok']]} memory: {mem['why']}")
    lines.append(
        f"{mark[model['ok']]} model: finite {model['finite']}, accuracy "
        f"{model['accuracy']:.4f} vs twin {model['twin_accuracy']:.4f} "
        f"({model['gap_points']} points, at most {model['allowed_points']}); held-out loss "
        f"{model['loss']:.4f} vs {model['twin_loss']:.4f}"
    )
    if acc["from_log"] == 0 and acc["retrained_after_restart"]:
        lines.append(
            "note: no update was taken from a round's log: this coordinator re-runs a round "
            "after a restart, and the accounting holds with every update uploaded again"
        )
    if "round_log" in c:
        lines.append(f"{mark[c['round_log']['ok']]} round log: {c['round_log']}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("runs/soak"))
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hidden", type=int, default=8192, help="digits' hidden width (the model's size)"
    )
    parser.add_argument("--client-kills", type=int, default=12)
    parser.add_argument("--coordinator-kills", type=int, default=3)
    parser.add_argument("--cuts", type=int, default=20)
    parser.add_argument(
        "--memory-rounds", type=int, nargs=2, default=[5, 50], metavar=("FIRST", "LAST")
    )
    parser.add_argument("--memory-tolerance", type=float, default=0.05)
    parser.add_argument("--accuracy-points", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds each run may take")
    parser.add_argument(
        "--expect-round-log",
        action="store_true",
        help="fail when an acknowledged update is trained again after a coordinator restart",
    )
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_both(args)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = summary_lines(result)
    (args.out / "soak.md").write_text(markdown(result, lines))
    print("\n".join(lines))
    print(f"{'PASS' if result['ok'] else 'FAIL'}: {args.out / 'soak.md'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
