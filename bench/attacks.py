"""`python -m bench.attacks`: hostile peers against a real coordinator, on loopback.

Each attack starts `python -m fedstream server` (the built-in `digits` task) as a child
process in a temporary directory, reads its bound address from RUN_DIR/coordinator.json,
and plays a bounded number of hostile calls against it through the service's own stubs
(`fedstream.common.service`), or starts a second `fedstream` process where the attack is
one. It prints a markdown table, attack | what happens | measured figure, measured in this
run; nothing is assumed. The whole run takes a few minutes (about 2 of them are the round
timeouts attacks 4 and 5 wait out).

    python -m bench.attacks > bench/ATTACKS.md

Progress goes to stderr. Attack 12 mounts a 1 MiB tmpfs as the spool directory, so it
needs root; without it the row says it was skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.adversary import (
    MIB,
    NOTES,
    ROWS,
    TASK,
    Coordinator,
    Peer,
    code_of,
    digest,
    header,
    junk_status,
    layout,
    log,
    reap,
    row,
    start_client,
)
from bench.attacks_disk import metrics_attack, run_dir_attacks, spool_attack
from fedstream.common.service import METHODS
from fedstream.common.tokens import new_token, token_hash
from fedstream.common.wire.framing import frame_data

# ---- the attacks ----------------------------------------------------------------------


def session_attacks(work: Path) -> None:
    """1, 3, 7 and 6 on one coordinator whose round 1 is open for a peer named `chosen`."""
    server = Coordinator(
        work, "s1", "--rounds", "1", "--min-clients", "1", "--round-timeout", "120"
    )
    good = digest()
    chosen = Peer(server.address)
    try:
        chosen.join("chosen", good)
        chosen.until_train()

        thief = Peer(server.address)
        taken = code_of(lambda: thief.join("chosen", good))
        kept = code_of(chosen.poll)
        row(
            1,
            "Join under a live client's name, no credentials",
            f"`{taken}`; the live client's next call: `{kept}`",
            "live session kept" if kept == "OK" else "live session LOST",
        )

        outsider = Peer(server.address)
        outsider.join("late", good)
        refused = code_of(outsider.download)
        allowed = code_of(chosen.download)
        row(
            3,
            "Joined but unselected peer downloads the model",
            f"`{refused}` (the selected peer: `{allowed}`)",
            "0 model bytes to the outsider" if refused != "OK" else "model served to outsider",
        )

        codes = {name: junk_status(chosen.channel, name, chosen.token) for name in METHODS}
        distinct = sorted(set(codes.values()))
        row(
            7,
            "Junk bytes to every RPC (a live session's token)",
            ", ".join(f"{k} `{v}`" for k, v in codes.items()),
            f"{len(codes)} RPCs, statuses seen: {', '.join(distinct)}; "
            f"coordinator {'alive' if server.proc.poll() is None else 'DEAD'}",
        )

        tensors = layout()
        first = header(tensors)
        big = frame_data(bytes(60 * MIB))
        time.sleep(1.0)
        before, _ = server.rss_mib()
        seen: dict[str, int] = {}
        started = time.monotonic()
        after_one = before
        for i in range(100):
            code = code_of(lambda: chosen.upload(iter([first, big]), timeout=30))
            seen[code] = seen.get(code, 0) + 1
            if i == 0:
                time.sleep(1.0)
                after_one, _ = server.rss_mib()
        spent = time.monotonic() - started
        time.sleep(1.0)
        after, peak = server.rss_mib()
        time.sleep(5.0)
        settled, _ = server.rss_mib()
        row(
            6,
            "100 upload messages of 60 MiB (a data chunk over --max-chunk-bytes 16 MiB)",
            ", ".join(f"`{k}` x{v}" for k, v in seen.items()) + f" (in {spent:.0f}s)",
            f"coordinator VmRSS {before:.0f} MiB before, {after_one:.0f} MiB after the "
            f"first, {after:.0f} MiB 1 s after the 100th ({after - before:+.0f} MiB), "
            f"{settled:.0f} MiB 6 s after; VmHWM {peak:.0f} MiB",
        )
    finally:
        chosen.close()
        server.stop()


def token_attacks(work: Path) -> None:
    a, b = new_token(), new_token()
    tokens = work / "tokens.txt"
    tokens.write_text(f"site-a {token_hash(a)}\nsite-b {token_hash(b)}\n")
    server = Coordinator(work, "s2", "--rounds", "1", "--min-clients", "5", "--tokens", str(tokens))
    good = digest()
    peer = Peer(server.address)
    try:
        wrong = code_of(lambda: peer.join("site-a", good, token=b))
        none = code_of(lambda: peer.join("site-a", good))
        unknown = code_of(lambda: peer.join("site-c", good, token=new_token()))
        own = code_of(lambda: peer.join("site-a", good, token=a))
        row(
            2,
            "With --tokens: Join as site-a with site-b's token / with no token",
            f"site-b's token `{wrong}`; no token `{none}`",
            f"an unknown token `{unknown}`; site-a's own token `{own}`",
        )
    finally:
        peer.close()
        server.stop()


def burst(address: str, count: int, model_digest: str) -> tuple[list[Peer], dict[str, int]]:
    """`count` Joins under distinct names at once; the joined peers and every status."""
    peers = [Peer(address) for _ in range(count)]
    codes: dict[str, int] = {}
    joined: list[Peer] = []

    def join(i: int) -> tuple[Peer, str]:
        return peers[i], code_of(lambda: peers[i].join(f"bot-{i:03d}", model_digest, timeout=20))

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        for peer, code in pool.map(join, range(count)):
            codes[code] = codes.get(code, 0) + 1
            if code == "OK":
                joined.append(peer)
            else:
                peer.close()
    return joined, codes


def burst_attacks(work: Path) -> None:
    silent_burst(work, "s4", [])
    silent_burst(work, "s4b", ["--heartbeat-seconds", "2"])
    good = digest()
    capped = Coordinator(
        work, "s5", "--rounds", "1", "--min-clients", "1000", "--max-clients", "50"
    )
    bots: list[Peer] = []
    try:
        bots, codes = burst(capped.address, 200, good)
        row(
            4,
            "... the same burst against --max-clients 50",
            ", ".join(f"`{k}` x{v}" for k, v in sorted(codes.items())),
            f"{codes.get('RESOURCE_EXHAUSTED', 0)} of 200 Joins refused",
        )
    finally:
        for bot in bots:
            bot.close()
        capped.stop()


def silent_burst(work: Path, name: str, extra: list[str]) -> None:
    good = digest()
    server = Coordinator(
        work, name, "--rounds", "1", "--min-clients", "201", "--round-timeout", "20", *extra
    )
    bots: list[Peer] = []
    try:
        started = time.monotonic()
        bots, codes = burst(server.address, 200, good)
        joins_s = time.monotonic() - started
        honest = start_client(work, server.address, "honest")
        opened = server.wait_log("round 1/1 started", 60)
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            took = list(pool.map(lambda p: code_of(p.until_train), bots))
        holding = took.count("OK")
        code = server.wait_exit(90)
        client_code = reap(honest, 30)
        records = server.metrics()
        release = 3 * float(extra[1] if extra else 10)
        if records:
            r = records[0]
            figure = (
                f"round open {r['duration_s']:.1f}s (round timeout 20 s; 3 missed heartbeats "
                f"= {release:g} s): {r['updates']} update of {r['clients_selected']} selected"
            )
        else:
            figure = f"no round completed (round opened: {opened}; server exit {code})"
        heartbeat = " ".join(extra) or "default --heartbeat-seconds 10"
        row(
            4,
            f"200 Joins in a burst (never heartbeat), then one honest client ({heartbeat})",
            f"joins {', '.join(f'`{k}` x{v}' for k, v in codes.items())} in {joins_s:.1f}s; "
            f"{holding} bots took the train task and went silent; honest client exit "
            f"{client_code}, coordinator exit {code}",
            figure,
        )
    finally:
        for bot in bots:
            bot.close()
        server.stop()


def trickle_attack(work: Path) -> None:
    """5, with 10 first: a client of another model layout tries to join the same round."""
    server = Coordinator(work, "s6", "--rounds", "1", "--min-clients", "2", "--round-timeout", "20")
    slow = Peer(server.address)
    stop = threading.Event()
    try:
        wrong = start_client(work, server.address, "wrong-layout", "--task-opt", "hidden=64")
        wrong_code = reap(wrong, 60)
        said = [
            line.strip()
            for line in (work / "client-wrong-layout.log").read_text().splitlines()
            if "FAILED_PRECONDITION" in line or "laid out" in line or "refus" in line
        ]
        joined_lines = [line for line in server.lines() if " joined (partition" in line]

        slow.join("trickler", digest())
        honest = start_client(work, server.address, "honest")
        slow.until_train()
        tensors = layout()

        def trickle() -> Iterator[bytes]:
            yield header(tensors)
            for _ in range(30):
                if stop.wait(5.0):
                    return
                yield frame_data(b"\0")  # one byte every 5 s

        started = time.monotonic()
        code = code_of(lambda: slow.upload(trickle(), timeout=120))
        cut_after = time.monotonic() - started
        stop.set()
        exit_code = server.wait_exit(90)
        client_code = reap(honest, 30)
        records = server.metrics()
        r = records[0] if records else {}
        if cut_after >= 38:
            verdict = (
                "OLD BEHAVIOUR: the --min-transfer-rate floor did not cut it; only the hard end did"
            )
            NOTES.append(
                "5: the trickle ran until the round's hard end. `Coordinator.__init__` "
                "(server/coordinator.py) builds `UploadIntake(config, manifest, spool_path)` "
                "without `min_rate=`, `window=` or `max_uploads=`, so the intake's "
                "`RateFloor` gets min_rate 0.0 (off) and --max-uploads is not applied either. "
                "A check with --transfer-window 6 and 1 byte/s: not cut in 30 s."
            )
        else:
            verdict = "cut by the --min-transfer-rate floor"
        row(
            5,
            "A selected peer trickles 1 byte every 5 s into its upload (round timeout 20 s)",
            f"the trickler gets `{code}` {cut_after:.1f}s into its upload ({verdict}); "
            f"honest client exit {client_code}",
            f"round open {r.get('duration_s', float('nan')):.1f}s "
            f"(--transfer-window 30 s, hard end 40 s); updates {r.get('updates')}, "
            f"rejected uploads {r.get('rejected_uploads')}",
        )
        row(
            10,
            "A client with another layout (--task-opt hidden=64) joins",
            f"client exit {wrong_code}: {said[0][-160:].strip() if said else '(no refusal line)'}",
            f"not a member: {len(joined_lines)} sessions when it gave up; the round opened "
            f"without it, with {r.get('clients_selected')} selected (the honest client and "
            "the trickler)",
        )
        del exit_code
    finally:
        stop.set()
        slow.close()
        server.stop()


ATTACKS: list[Callable[[Path], None]] = [
    session_attacks,
    token_attacks,
    burst_attacks,
    trickle_attack,
    run_dir_attacks,
    spool_attack,
    metrics_attack,
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attacks", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fedstream-attacks-"))
    started = time.monotonic()
    try:
        for attack in ATTACKS:
            try:
                attack(work)
            except Exception as exc:  # noqa: BLE001 (a failed attack is a row, not a crash)
                row(0, attack.__name__, f"BENCH ERROR: {type(exc).__name__}: {exc}", "-")
    finally:
        if args.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print("# Attacks against a live coordinator\n")
    print(f"`python -m bench.attacks`, {when}, {time.monotonic() - started:.0f} s in all;")
    print(
        f"task `{TASK}`, coordinator and clients as `python -m fedstream` processes on loopback.\n"
    )
    print("| # | attack | what happens now | measured figure |")
    print("| --- | --- | --- | --- |")
    for r in sorted(ROWS, key=lambda r: r.number):
        cells = [str(r.number), r.attack, r.now, r.figure]
        print("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    if NOTES:
        print("\nNotes:\n")
        for note in NOTES:
            print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
