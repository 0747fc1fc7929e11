"""docker-compose.yml: valid for Compose, consistent, and its commands run a real cluster.

No test here needs a Docker daemon. The cluster test reads each service's `command` and
runs it as a local process through the same CLI, changing only what must differ outside
containers: addresses (the service name `server` becomes 127.0.0.1 on a free port, so
the server certificate is made for 127.0.0.1 as well) and volume paths (a named volume
becomes a folder under tmp_path). So a command that the containers would reject fails
here too: the one-shot `certs` service runs first, then the server and clients with the
certificates it made, over mutual TLS.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedstream.common.checkpoint import read_checkpoint_metadata

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
CLUSTER_TIMEOUT = 240.0
"""Seconds for the whole cluster to finish; five digits rounds take a few seconds."""


def compose_cli() -> list[str] | None:
    """`docker-compose`, else the `docker compose` plugin, else None."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def services() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    return dict(document["services"])


def command(service: dict[str, Any]) -> list[str]:
    """A service's command as argv: Compose splits a string command like a shell does."""
    raw = service["command"]
    return shlex.split(raw) if isinstance(raw, str) else [str(arg) for arg in raw]


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"expected {name} exactly once in {args}"
    return args[args.index(name) + 1]


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount target -> volume name, for the service's named volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        mounts[target] = source
    return mounts


def all_mounts(all_services: dict[str, dict[str, Any]], root: Path) -> dict[str, Path]:
    """Mount target -> a folder under `root` for its volume, over every service (each
    target holds the same volume wherever it is mounted)."""
    volumes: dict[str, str] = {}
    for name, service in all_services.items():
        for target, source in volume_mounts(service).items():
            assert volumes.setdefault(target, source) == source, (name, target)
    return {target: root / source for target, source in volumes.items()}


def client_services(all_services: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    return {
        name: command(service)
        for name, service in all_services.items()
        if command(service)[0] == "client"
    }


def localize(
    args: list[str], address: str, service_names: set[str], mounts: dict[str, Path]
) -> list[str]:
    """A container's argv made runnable here: addresses and volume paths rewritten, and
    the server certificate made for the host of `address` too."""
    out = []
    for i, arg in enumerate(args):
        previous = args[i - 1] if i else ""
        container_address = previous == "--address"
        service_address = previous == "--server" and arg.rpartition(":")[0] in service_names
        if container_address or service_address:
            arg = address
        elif previous == "--server-name":
            arg = f"{arg},{address.rpartition(':')[0]}"
        else:
            for target, local in mounts.items():
                prefix = target.rstrip("/")
                if arg == prefix or arg.startswith(prefix + "/"):
                    arg = str(local) + arg[len(prefix) :]
        out.append(arg)
    return out


def test_compose_config_is_valid() -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip(
            "docker-compose is not installed (`.ci/system-tools install` installs Debian's "
            "docker-compose, as root)"
        )
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{' '.join(cli)} config -q failed:\n{result.stderr}"


def test_compose_cluster_is_consistent() -> None:
    """Clients reach the server's port, cover every partition once, and run its task;
    everyone speaks mutual TLS with the certificates the `certs` service makes first."""
    all_services = services()
    certs_args = command(all_services["certs"])
    assert certs_args[0] == "certs"
    certs_dir = flag(certs_args, "--out").rstrip("/")
    made = {"ca", "server", *flag(certs_args, "--clients").split(",")}
    server_names = flag(certs_args, "--server-name").split(",")
    # the host clients dial and the one the healthcheck dials
    assert "server" in server_names and "localhost" in server_names, server_names
    assert "localhost:" in all_services["server"]["healthcheck"]["test"][-1]

    def certificate(args: list[str], option: str) -> str:
        """The stem of the file `option` names, which must be one `certs` makes."""
        path = flag(args, option)
        directory, _, file = path.rpartition("/")
        stem, _, ext = file.rpartition(".")
        assert directory == certs_dir and stem in made and ext in ("pem", "key"), path
        return stem

    server_args = command(all_services["server"])
    assert certificate(server_args, "--tls-cert") == certificate(server_args, "--tls-key")
    assert certificate(server_args, "--tls-cert") == "server"
    assert certificate(server_args, "--client-ca") == "ca"
    assert server_args[0] == "server"
    port = flag(server_args, "--address").rpartition(":")[2]
    clients = client_services(all_services)
    assert int(flag(server_args, "--min-clients")) == len(clients)
    assert sorted(int(flag(args, "--partition")) for args in clients.values()) == list(
        range(len(clients))
    )
    assert len({flag(args, "--name") for args in clients.values()}) == len(clients)
    for name, args in clients.items():
        assert flag(args, "--server") == f"server:{port}", name
        assert int(flag(args, "--num-partitions")) == len(clients), name
        assert flag(args, "--task") == flag(server_args, "--task"), name
        assert "server" in all_services[name]["depends_on"], name
        assert all_services[name]["image"] == all_services["server"]["image"], name
        assert certificate(args, "--ca") == "ca", name
        # the certificate's common name is the identity: the client's own
        assert certificate(args, "--cert") == certificate(args, "--key") == flag(args, "--name")
    for name in ("server", *clients):
        after = all_services[name]["depends_on"]["certs"]
        assert after["condition"] == "service_completed_successfully", name
        assert certs_dir in volume_mounts(all_services[name]), name
    run_dir = flag(server_args, "--run-dir")
    assert any(
        run_dir.startswith(target.rstrip("/") + "/")
        for target in volume_mounts(all_services["server"])
    ), f"--run-dir {run_dir} is not on a volume: the run would vanish with the container"


@pytest.mark.e2e
def test_compose_cluster_runs_as_local_processes(procs, free_port, wait_for, tmp_path) -> None:
    all_services = services()
    address = f"127.0.0.1:{free_port()}"
    server_service = all_services["server"]
    mounts = all_mounts(all_services, tmp_path / "volumes")
    for path in mounts.values():
        path.mkdir(parents=True)

    certs = procs("certs", *localize(command(all_services["certs"]), address, set(), mounts))
    assert procs.wait_all(60, [certs]) == {"certs": 0}

    server_args = localize(command(server_service), address, set(all_services), mounts)
    run_dir = Path(flag(server_args, "--run-dir"))
    rounds = int(flag(server_args, "--rounds"))

    # The healthcheck, pointed at our address: failing before the server runs,
    # passing once it serves.
    check = server_service["healthcheck"]["test"]
    assert check[:2] == ["CMD", "python"], check
    container_port = command(server_service)[command(server_service).index("--address") + 1]
    container_port = container_port.rpartition(":")[2]
    healthcheck = [sys.executable]
    for arg in check[2:]:
        arg = arg.replace(f"localhost:{container_port}", address)
        for target, local in mounts.items():
            arg = arg.replace(target.rstrip("/") + "/", f"{local}/")
        healthcheck.append(arg)

    def healthy() -> bool:
        return subprocess.run(healthcheck, capture_output=True, timeout=30).returncode == 0

    assert not healthy(), "the healthcheck passes with no server running"

    server = procs("server", *server_args)
    wait_for(healthy, 90, "the server's healthcheck to pass", interval=0.5, alive=[server])
    clients = [
        procs(name, *localize(args, address, set(all_services), mounts))
        for name, args in client_services(all_services).items()
    ]

    codes = procs.wait_all(CLUSTER_TIMEOUT, [server, *clients])
    assert codes == {p.name: 0 for p in [server, *clients]}
    assert "mutual TLS" in server.log()

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    assert all(r["updates"] == len(clients) for r in records), records
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoints = sorted((run_dir / "checkpoints").glob("*.safetensors"))
    assert checkpoints, f"no checkpoints in {run_dir}"
    assert checkpoints[-1].name == f"round_{rounds:05d}.safetensors"
    metadata = read_checkpoint_metadata(checkpoints[-1])
    assert metadata["round"] == str(rounds)
    assert metadata["task"] == flag(server_args, "--task")
