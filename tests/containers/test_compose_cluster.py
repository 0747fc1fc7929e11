"""docker-compose.yml run as real containers, on a Docker daemon of the test's own.

The test starts a private `dockerd` with no bridge network (no iptables, no NAT: every
container shares the host's network and talks over loopback only), builds the Debian
base image with mmdebstrap (`make base-image`, no registry needed), the wheelhouse
(`make wheelhouse`) and the image from it with `--network none` (`make image`), then
runs `docker-compose up` with docker-compose.host.yml on a free loopback port. It asserts
that every service exits 0, that the server completed its rounds, and that the last
checkpoint, copied out of the runs volume, loads with safetensors. The daemon's data root
(FEDSTREAM_DOCKER_ROOT, default /var/tmp/fedstream-docker) outlives the test, so a second
run reuses the base image and the image's cached layers. See docs/containers.md.

Skips, saying why, where this cannot run: not root, a tool missing (`.ci/containers`
installs them), under about 5 GB free, or a daemon that does not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

from fedstream.common.checkpoint import read_checkpoint_metadata

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
HOST_OVERRIDE = ROOT / "docker-compose.host.yml"
DOCKER_ROOT = Path(os.environ.get("FEDSTREAM_DOCKER_ROOT", "/var/tmp/fedstream-docker"))
MIN_FREE_BYTES = 5 * 10**9
BASE_IMAGE = "fedstream-base:bookworm"
PROJECT = "fedstream-containers-test"
PORT_VARIABLE = "FEDSTREAM_PORT"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
DOCKERD_FLAGS = [
    "--bridge=none",
    "--iptables=false",
    "--ip6tables=false",
    "--ip-masq=false",
    "--ip-forward=false",
    "--userland-proxy=false",
]
"""No bridge, no NAT, no firewall rules: the daemon touches nothing of the host's network."""
TOOLS = ("dockerd", "docker", "docker-compose", "mmdebstrap", "make")
BUILD_TIMEOUT = 1200
UP_TIMEOUT = 600


def load_yaml(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


def with_port(value: Any, port: int) -> Any:
    """`value` (a string or list from the override) with FEDSTREAM_PORT set to `port`."""
    if isinstance(value, list):
        return [with_port(item, port) for item in value]
    return value.replace(f"${{{PORT_VARIABLE}:-50051}}", str(port))


def test_host_override_changes_only_the_network() -> None:
    """docker-compose.host.yml repeats docker-compose.yml's commands with only the server's
    address moved to loopback: a flag changed in one file and not the other fails here."""
    base = load_yaml(COMPOSE_FILE)["services"]
    override = load_yaml(HOST_OVERRIDE)["services"]
    assert set(override) == set(base)
    port = int(base["server"]["command"].split("--address ")[1].split()[0].rpartition(":")[2])
    for name, service in override.items():
        assert service["network_mode"] == "host", name
        if "command" in service:
            expected = base[name]["command"].replace(f"0.0.0.0:{port}", f"127.0.0.1:{port}")
            assert with_port(service["command"], port) == expected, name
        if name.startswith("client-"):
            assert service["extra_hosts"] == ["server:127.0.0.1"], name
    check = override["server"]["healthcheck"]["test"]
    assert with_port(check, port) == base["server"]["healthcheck"]["test"]


class Docker:
    """The docker CLI and docker-compose, pointed at one daemon's socket."""

    def __init__(self, socket: Path) -> None:
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{socket}"}

    def run(
        self, *args: str | Path, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(a) for a in args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check:
            assert result.returncode == 0, (
                f"{' '.join(map(str, args))} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def inspect(self, *names: str) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = json.loads(self.run("docker", "inspect", *names).stdout)
        return records


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run its own dockerd"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (.ci/containers installs them as root)"
    existing = next(p for p in (DOCKER_ROOT, *DOCKER_ROOT.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        return f"{free / 1e9:.1f} GB free under {existing}, the images need about 5 GB"
    return None


def mounts_under(*roots: Path) -> list[str]:
    """Mount points at or below `roots`, deepest first (so each unmounts before its parent)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if any(point == str(r) or point.startswith(f"{r}/") for r in roots):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def stop_dockerd(daemon: subprocess.Popen[bytes], roots: tuple[Path, ...]) -> None:
    """SIGTERM the daemon (it stops its containers and its containerd), then whatever of
    its process group is left, then unmount what it leaves (an nsfs under its exec root)."""
    if daemon.poll() is None:
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(daemon.pid, signal.SIGKILL)
    for point in mounts_under(*roots):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)


@pytest.fixture
def docker(wait_for: Callable[..., object]) -> Iterator[Docker]:
    """A private dockerd: its own data root, exec root, pidfile and socket."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    DOCKER_ROOT.mkdir(parents=True, exist_ok=True)
    # A short path under /tmp: the socket's path must fit a sockaddr_un (108 bytes).
    exec_root = Path(tempfile.mkdtemp(prefix="fsd-", dir="/tmp"))
    socket = exec_root / "docker.sock"
    log_path = exec_root / "dockerd.log"
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(
            [
                "dockerd",
                *DOCKERD_FLAGS,
                f"--data-root={DOCKER_ROOT}",
                f"--exec-root={exec_root / 'exec'}",
                f"--pidfile={exec_root / 'dockerd.pid'}",
                f"--host=unix://{socket}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = Docker(socket)
    try:

        def ready() -> bool:
            if daemon.poll() is not None:
                return True
            return client.run("docker", "info", check=False, timeout=30).returncode == 0

        with contextlib.suppress(AssertionError):
            wait_for(ready, 60, "dockerd to answer", interval=0.5)
        if daemon.poll() is not None or not ready():
            tail = log_path.read_text(errors="replace")[-2000:]
            pytest.skip(f"dockerd cannot start here:\n{tail}")
        yield client
    finally:
        stop_dockerd(daemon, (exec_root, DOCKER_ROOT))
        shutil.rmtree(exec_root, ignore_errors=True)


def timed(timings: dict[str, float], name: str, action: Callable[[], object]) -> None:
    start = time.monotonic()
    action()
    timings[name] = time.monotonic() - start


@pytest.mark.containers
@pytest.mark.timeout(BUILD_TIMEOUT + UP_TIMEOUT + 300)
def test_compose_cluster_runs_as_containers(
    docker: Docker, free_port: Callable[[], int], tmp_path: Path
) -> None:
    image = load_yaml(COMPOSE_FILE)["services"]["server"]["image"]
    timings: dict[str, float] = {}
    if docker.run("docker", "image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        timed(timings, "base", lambda: docker.run("make", "base-image", timeout=BUILD_TIMEOUT))
    timed(timings, "wheelhouse", lambda: docker.run("make", "wheelhouse", timeout=BUILD_TIMEOUT))
    assert list((ROOT / "wheels").glob("torch-*.whl")), "the wheelhouse holds no torch wheel"
    timed(
        timings,
        "image",
        lambda: docker.run(
            "make", "image", f"BASE={BASE_IMAGE}", f"IMAGE={image}", timeout=BUILD_TIMEOUT
        ),
    )
    config = docker.inspect(image)[0]["Config"]
    assert config["User"] == "fedstream", "the image runs as root"
    assert config["Healthcheck"]["Test"][0] == "CMD-SHELL"
    assert "fedstream status" in config["Healthcheck"]["Test"][1]

    port = free_port()
    compose: list[str | Path] = ["docker-compose", "--project-name", PROJECT, "-f", COMPOSE_FILE]
    compose += ["-f", HOST_OVERRIDE]
    docker.env[PORT_VARIABLE] = str(port)
    services = load_yaml(COMPOSE_FILE)["services"]
    merged = yaml.safe_load(docker.run(*compose, "config").stdout)["services"]
    off_host = sorted(n for n, s in merged.items() if s.get("network_mode") != "host")
    assert not off_host, f"refusing to start services off the host network: {off_host}"
    assert f"127.0.0.1:{port}" in merged["server"]["command"]

    docker.run(*compose, "down", "--volumes", "--timeout", "5")  # an earlier run's volumes
    try:
        timed(
            timings,
            "up",
            lambda: docker.run(*compose, "up", "--no-build", "--no-color", timeout=UP_TIMEOUT),
        )
        ids = docker.run(
            "docker", "ps", "--all", "--quiet", "--filter", f"label={PROJECT_LABEL}={PROJECT}"
        ).stdout.split()
        containers = {c["Config"]["Labels"][SERVICE_LABEL]: c for c in docker.inspect(*ids)}
        table = docker.run("docker", "ps", "--all").stdout
        exits = {
            name: (c["State"]["Status"], c["State"]["ExitCode"]) for name, c in containers.items()
        }
        assert exits == dict.fromkeys(services, ("exited", 0)), table
        server_log = docker.run(*compose, "logs", "--no-color", "server").stdout
        rounds = int(services["server"]["command"].split("--rounds ")[1].split()[0])
        assert f"run complete: {rounds} rounds" in server_log, server_log[-4000:]

        server_id = containers["server"]["Id"]
        docker.run("docker", "cp", f"{server_id}:/runs/compose/checkpoints", tmp_path)
        checkpoints = sorted((tmp_path / "checkpoints").glob("*.safetensors"))
        assert checkpoints and checkpoints[-1].name == f"round_{rounds:05d}.safetensors"
        assert read_checkpoint_metadata(checkpoints[-1])["round"] == str(rounds)
        assert load_file(checkpoints[-1]), "the last checkpoint holds no tensors"

        size = docker.inspect(image)[0]["Size"]
        print(
            "\ncontainers test timings (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        )
        print(f"image {image}: {size / 1e9:.2f} GB\n{table}")
    finally:
        docker.run(*compose, "down", "--volumes", "--timeout", "5", check=False)
