"""`fedstream client --nproc-per-node K`: a site of K ranks on this machine, through torchrun.

The launcher is torch's own elastic agent (torch.distributed.run, what `torchrun` runs),
not one of ours: it starts K processes of the same `fedstream client` command line with
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set (a process that finds
RANK set runs as that rank instead of launching), watches them, and when one dies it
stops the others and starts all K again, up to `--max-restarts` times; rank 0 of the new
group joins the coordinator again under the site's name. See docs/multi-gpu-sites.md.
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from fedstream.client.config import ClientConfig

log = logging.getLogger(__name__)

MONITOR_INTERVAL = 0.5
"""Seconds between the agent's looks at its ranks: how soon a dead rank is noticed."""
EXIT_SITE_FAILED = 3
"""The site's ranks kept failing after `--max-restarts` restarts (loop.EXIT_RANK_LOST)."""


def rank_command() -> list[str]:
    """This process's own `fedstream client ...` arguments, for every rank to run."""
    return ["-m", "fedstream", *sys.argv[1:]]


def launch_site(config: ClientConfig) -> int:
    """Run the site's `config.nproc_per_node` ranks to the end; 0 when they all exit 0."""
    args = parse_args(
        [
            "--standalone",
            f"--nproc-per-node={config.nproc_per_node}",
            f"--max-restarts={config.max_restarts}",
            f"--monitor-interval={MONITOR_INTERVAL}",
            *rank_command(),
        ]
    )
    log.info(
        "site %s: starting %d ranks (torch.distributed.run; up to %d restarts)",
        config.name,
        config.nproc_per_node,
        config.max_restarts,
    )
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        log.error(
            "site %s: its ranks kept failing (rank %d exited with code %d, after %d restarts)",
            config.name,
            rank,
            failure.exitcode,
            config.max_restarts,
        )
        return EXIT_SITE_FAILED
    return 0
