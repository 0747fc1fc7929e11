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
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from fedstream.common.checkpoint import load_checkpoint, save_checkpoint
from fedstream.common.framing import frame_data
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.service import METHODS, bearer_metadata, stub
from fedstream.common.tensor_codec import Manifest
from fedstream.common.tokens import new_token, token_hash
from fedstream.tasks import exchanged_names, load_task

MIB = 1 << 20
TASK = "digits"
JUNK = b"\x0a\xff\xff\xff\x7fjunk"
"""Undecodable as any message: field 1 claims 256 MiB of bytes and four follow."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- the model a digits client would send -----------------------------------------------


def layout(options: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Zeros in the layout of the tensors a digits client exchanges (an update of 0)."""
    task = load_task(TASK, options or {}, 0)
    model = task.build_model()
    state = model.state_dict()
    return {n: torch.zeros_like(state[n]) for n in exchanged_names(task, model)}


def digest(options: dict[str, str] | None = None) -> str:
    return Manifest.from_tensors(layout(options)).digest()


def header(tensors: dict[str, torch.Tensor], round_number: int = 1) -> bytes:
    msg = pb.UpdateHeader(round=round_number, model_version=0, num_examples=10)
    msg.manifest.CopyFrom(Manifest.from_tensors(tensors).to_proto())
    return pb.UpdateChunk(header=msg).SerializeToString()


def update_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())


# ---- processes ------------------------------------------------------------------------


def fedstream(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedstream", *args]


class Coordinator:
    """`fedstream server` as a child process, its output in a log file."""

    def __init__(self, work: Path, name: str, *args: str, wait: bool = True) -> None:
        self.run_dir = work / name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = work / f"{name}.server{len(list(work.glob(name + '.server*')))}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                fedstream(
                    "server",
                    "--address", "127.0.0.1:0",
                    "--run-dir", str(self.run_dir),
                    "--task", TASK,
                    "--poll-timeout", "1",
                    "--done-grace", "2",
                    "--threads", "1",
                    *args,
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.address = self._address() if wait else ""

    def _address(self, timeout: float = 60.0) -> str:
        path = self.run_dir / "coordinator.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            if path.exists():
                try:
                    info = json.loads(path.read_text())
                except ValueError:
                    info = {}
                if info.get("pid") == self.proc.pid:
                    return str(info["address"])
            time.sleep(0.1)
        raise TimeoutError(f"server did not listen in {timeout:.0f}s: {self.tail()}")

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.text().splitlines()

    def tail(self, n: int = 3) -> str:
        return " / ".join(line.strip() for line in self.lines()[-n:])

    def rss_mib(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the coordinator, in MiB."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def wait_log(self, fragment: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if fragment in self.text():
                return True
            if self.proc.poll() is not None:
                return fragment in self.text()
            time.sleep(0.1)
        return False

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(15) is None:
                self.proc.kill()
                self.proc.wait()


def start_client(work: Path, address: str, name: str, *args: str) -> subprocess.Popen[bytes]:
    with open(work / f"client-{name}.log", "wb") as out:
        return subprocess.Popen(
            fedstream(
                "client",
                "--server", address,
                "--task", TASK,
                "--name", name,
                "--partition", "0",
                "--num-partitions", "2",
                "--give-up-after", "30",
                "--max-backoff", "1",
                "--threads", "1",
                *args,
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def reap(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


# ---- a hand-driven peer ---------------------------------------------------------------


def code_of(call: Callable[[], object]) -> str:
    """The status name a call ends with ("OK" when it succeeds)."""
    try:
        call()
    except grpc.RpcError as exc:
        return str(exc.code().name)  # type: ignore[attr-defined]
    return "OK"


class Peer:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", 256 * MIB),
                ("grpc.max_receive_message_length", 256 * MIB),
            ],
        )
        self.join_call = stub(self.channel, "Join")
        self.poll_call = stub(self.channel, "Poll")
        self.download_call = stub(self.channel, "Download")
        self.upload_call = self.channel.stream_unary(
            METHODS["Upload"].path,
            request_serializer=lambda raw: raw,
            response_deserializer=METHODS["Upload"].response_deserializer,
        )
        self.token = ""

    def join(
        self, name: str, model_digest: str, token: str | None = None, timeout: float = 10
    ) -> str:
        request = pb.JoinRequest(
            name=name, task=TASK, partition=0, num_partitions=1, model_digest=model_digest
        )
        metadata = bearer_metadata(token) if token else ()
        reply = self.join_call(request, metadata=metadata, timeout=timeout)
        self.token = str(reply.token)
        return self.token

    def poll(self) -> str:
        reply = self.poll_call(pb.PollRequest(), metadata=bearer_metadata(self.token), timeout=10)
        return str(reply.WhichOneof("action"))

    def until_train(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll() == "train":
                return
        raise TimeoutError("no train task")

    def download(self) -> int:
        request = pb.DownloadRequest(model_version=0)
        return len(
            list(self.download_call(request, metadata=bearer_metadata(self.token), timeout=10))
        )

    def upload(self, messages: Iterator[bytes], timeout: float = 60) -> object:
        return self.upload_call(messages, metadata=bearer_metadata(self.token), timeout=timeout)

    def close(self) -> None:
        self.channel.close()


def junk_status(channel: grpc.Channel, name: str, token: str) -> str:
    """The status RPC `name` answers undecodable request bytes with."""
    method = METHODS[name]
    call = stub(channel, name, request_serializer=lambda raw: raw, response_deserializer=bytes)
    request: Any = iter([JUNK]) if method.request_streaming else JUNK
    meta = bearer_metadata(token)
    if method.response_streaming:
        return code_of(lambda: list(call(request, metadata=meta, timeout=10)))
    return code_of(lambda: call(request, metadata=meta, timeout=10))


# ---- the attacks ----------------------------------------------------------------------


@dataclass
class Row:
    number: int
    attack: str
    now: str
    figure: str


ROWS: list[Row] = []
NOTES: list[str] = []


def row(number: int, attack: str, now: str, figure: str) -> None:
    log(f"{number}. {attack}: {now} | {figure}")
    ROWS.append(Row(number, attack, now, figure))


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


def run_dir_attacks(work: Path) -> None:
    """8 and 9 on one run directory."""
    first = Coordinator(work, "s7", "--rounds", "2", "--min-clients", "5")
    try:
        second = Coordinator(work, "s7", "--rounds", "2", "--min-clients", "5", wait=False)
        code = second.wait_exit(30)
        if code is None:
            second.stop()
            row(
                8,
                "A second coordinator on the same run directory",
                "OLD BEHAVIOUR: still running after 30 s (no run-directory lock)",
                f"log: {second.tail(1)[-200:]}",
            )
        else:
            row(
                8,
                "A second coordinator on the same run directory",
                f"exits {code}: {second.tail(1)[-220:]}",
                f"first coordinator {'still serving' if first.proc.poll() is None else 'DEAD'}",
            )
    finally:
        first.stop()

    checkpoints = first.run_dir / "checkpoints"
    good_path = checkpoints / "round_00000.safetensors"
    tensors, metadata = load_checkpoint(good_path)
    poisoned = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in tensors.items()
    }
    save_checkpoint(checkpoints / "round_00001.safetensors", poisoned, {**metadata, "round": "1"})
    resumed = Coordinator(work, "s7", "--rounds", "2", "--min-clients", "5", wait=False)
    try:
        code = resumed.wait_exit(20)
        lines = [
            line.strip()
            for line in resumed.lines()
            if "round_00001" in line or "resumed" in line or "NaN" in line or "Error" in line
        ]
        shown = " / ".join(x[-200:] for x in lines[:2]) or resumed.tail(2)
        text = resumed.text()
        if code is None:
            fate = "keeps running"
            if "at round 1 of" in text:
                fate = "OLD BEHAVIOUR: resumed FROM THE NaN CHECKPOINT, keeps running"
            elif "trying the checkpoint before it" in text and "at round 0 of" in text:
                fate = "skips it (warning), resumes from round 0, keeps running"
        else:
            fate = f"exits {code}"
        row(9, "Resume with a NaN checkpoint newer than the good one", fate, f"log: {shown}")
    finally:
        resumed.stop()

    # 11: a good model whose checkpoint history holds NaN and infinity (as json.dumps
    # writes them by default); the resume rewrites metrics.jsonl from that history.
    for stale in checkpoints.glob("round_*.safetensors"):
        if stale != good_path:
            stale.unlink()
    history = [
        {"round": 1, "model_version": 1, "duration_s": 1.0, "updates": 1,
         "train_loss": float("nan"), "eval_loss": float("inf")},
        {"round": 2, "model_version": 2, "duration_s": 1.0, "updates": 1,
         "train_loss": float("-inf"), "eval_loss": float("nan")},
    ]  # fmt: skip
    save_checkpoint(
        checkpoints / "round_00002.safetensors",
        tensors,
        {**metadata, "round": "2", "history": json.dumps(history)},
    )
    again = Coordinator(work, "s7", "--rounds", "3", "--min-clients", "5", wait=False)
    try:
        again.wait_log("resumed", 20)
        time.sleep(0.5)
        code = again.proc.poll()
        state = "running" if code is None else f"exit {code}"
        NOTES.append(
            "11: includes s7 resumed from a checkpoint whose history holds NaN and +-Infinity "
            f"(coordinator {state}: {again.tail(1)[-160:]})"
        )
    finally:
        again.stop()


def metrics_attack(work: Path) -> None:
    def refuse(token: str) -> float:
        raise ValueError(f"non-strict JSON constant {token}")

    lines = bad = 0
    for path in sorted(work.glob("*/metrics.jsonl")):
        for line in path.read_text().splitlines():
            lines += 1
            try:
                json.loads(line, parse_constant=refuse)
            except ValueError:
                bad += 1
    row(
        11,
        "metrics.jsonl holds only strict JSON (every run of this bench)",
        "every line parses" if not bad else f"{bad} line(s) are NOT strict JSON",
        f"{lines - bad} of {lines} lines strict",
    )


def spool_attack(work: Path) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        row(12, "A full spool disk", "skipped: not root (needs a tmpfs mount)", "-")
        return
    spool = work / "spool-tmpfs"
    spool.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(spool)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        row(12, "A full spool disk", f"skipped: mount failed ({mounted.stderr.strip()})", "-")
        return
    options = {"hidden": "8192"}  # a 2.4 MiB update for a 1 MiB spool
    server = Coordinator(
        work, "s8", "--rounds", "1", "--min-clients", "1", "--round-timeout", "120",
        "--task-opt", "hidden=8192", "--spool-dir", str(spool),
    )  # fmt: skip
    peer = Peer(server.address)
    try:
        peer.join("filler", digest(options))
        peer.until_train()
        tensors = layout(options)
        first = header(tensors)
        payload = update_bytes(tensors)
        chunks = [frame_data(payload[i : i + MIB]) for i in range(0, len(payload), MIB)]
        before = len(server.lines())
        seen: dict[str, int] = {}
        for _ in range(50):
            code = code_of(lambda: peer.upload(iter([first, *chunks]), timeout=30))
            seen[code] = seen.get(code, 0) + 1
        time.sleep(1.0)
        written = server.lines()[before:]
        row(
            12,
            f"Full spool disk (1 MiB tmpfs), 50 uploads of {len(payload) / MIB:.1f} MiB",
            ", ".join(f"`{k}` x{v}" for k, v in seen.items()),
            f"{len(written)} coordinator log lines for the 50 uploads: "
            + " / ".join(line.strip()[:170] for line in written[:2]),
        )
    finally:
        peer.close()
        server.stop()
        subprocess.run(["umount", str(spool)], check=False)


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
