"""A `fedstream client` process: the launcher of a site's ranks (`--nproc-per-node`), or
one rank of it (a process started on its own is a site of one). It builds the task and
the site, then runs the client loop on rank 0 (`loop.py`) or follows it on the others
(`follower.py`)."""

from __future__ import annotations

import logging

import torch

from fedstream.client import launch, steps
from fedstream.client.config import ClientConfig
from fedstream.client.follower import follow
from fedstream.client.loop import EXIT_RANK_LOST, EXIT_REFUSED, FederatedClient
from fedstream.client.site import Command, Ranks, Site, open_site
from fedstream.common.errors import FedstreamError
from fedstream.common.logs import setup_logging
from fedstream.common.memory import reuse_chunk_buffers
from fedstream.tasks import BUILTIN_TASKS, Task, TaskError, load_task

log = logging.getLogger(__name__)


def main(config: ClientConfig) -> int:
    ranks = Ranks.from_env()
    if ranks is None and config.nproc_per_node > 1:
        return launch.launch_site(config)
    ranks = ranks or Ranks(0, 1, 0)  # a process started on its own is a site of one
    if ranks.rank:
        setup_logging(config.log_level, f"{config.name}/rank{ranks.rank}")
    reuse_chunk_buffers()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = ranks.device(str(steps.device(config.device)))
    task = load_task(config.task, config.task_opt, config.seed)
    task.device = device
    try:
        task.load_data(*ranks.shard(config.partition, config.num_partitions))
    except OSError as exc:  # a data file missing or unreadable: the CLI's one-line exit 2
        raise TaskError(f"task {config.task} cannot load its data: {exc}") from None
    site = open_site(ranks, task.device, config.rank_timeout, config.site_parallel)
    try:
        return _run_rank(config, task, site)
    except RuntimeError as exc:  # gloo and NCCL report a lost peer as a bare RuntimeError
        if site.world == 1:
            raise
        log.error(
            "rank %d: the site's round failed (a rank died, raised, or hung past "
            "--rank-timeout); its processes exit to be restarted: %s",
            site.rank,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return EXIT_RANK_LOST
    finally:
        site.close()


def _run_rank(config: ClientConfig, task: Task, site: Site) -> int:
    """Rank 0 (or a client of one process) takes part in the run; another rank follows."""
    if not site.leader:
        return follow(site, task)
    try:
        client = FederatedClient(config, task, site)
    except FedstreamError as exc:
        log.error("cannot start: %s", exc)
        site.send(Command.END, str(EXIT_REFUSED).encode())
        return EXIT_REFUSED
    # --partition splits a built-in task's data; a user's own task loads its site's files.
    builtin = config.task in BUILTIN_TASKS
    share = f", partition {config.partition} of {config.num_partitions}" if builtin else ""
    ranks = f", {site.world} ranks" if site.world > 1 else ""
    log.info(
        "client %s: task %s%s, device %s%s", config.name, config.task, share, config.device, ranks
    )
    return client.run()
