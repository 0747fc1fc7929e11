"""The composition root: every part of the coordinator, built from its own part of the
configuration and handed to the `Coordinator`, which builds nothing itself.

    task, model        the task (ServerConfig.task, task_opt, seed) and its global model
    strategy           StrategyConfig, inside central DP when PrivacyConfig asks for it,
                       over one fragment a round with StreamingConfig's fragments
    run store          the run directory, the run's identity and its id (RunStore,
                       RunFile: the id outlives a restart)
    admission          SecurityConfig and TransportConfig: who may join, as whom
    upload intake      UplinkConfig and TransportConfig: uploads spooled and verified
    round's log        RoundLogConfig: acknowledged updates kept until their checkpoint
                       is on disk, cut uploads kept for a resume
    safeguards         SafeguardsConfig, and the aggregate behind them
    clock              monotonic, or the one a test drives

The daemon (`daemon.py`) adds the transport around the result: gRPC, TLS, the status page.
"""

from __future__ import annotations

import logging

from fedstream.common.config import ConfigError
from fedstream.server.admission.door import Admission
from fedstream.server.calls import Agreement
from fedstream.server.clock import Clock, MonotonicClock
from fedstream.server.config import ServerConfig
from fedstream.server.coordinator import Coordinator
from fedstream.server.fragments import Fragments, fragmented
from fedstream.server.global_model import GlobalModel
from fedstream.server.guarded_aggregate import GuardedAggregate
from fedstream.server.intake import UploadIntake
from fedstream.server.partial_uploads import PartialUploads
from fedstream.server.round_log import RoundLog
from fedstream.server.run_file import RunFile
from fedstream.server.run_store import RunIdentity, RunStore
from fedstream.server.safeguards import Safeguards
from fedstream.server.starting_weights import restore
from fedstream.server.strategies import Strategy
from fedstream.server.strategies.build import build_strategy
from fedstream.server.strategies.private import with_privacy
from fedstream.tasks import Task, exchanged_names, load_task

log = logging.getLogger(__name__)


def run_identity(config: ServerConfig, task: Task) -> RunIdentity:
    """What a resume must agree on: the task's site options (a data path) may change."""
    shaping = {k: v for k, v in config.task_opt.items() if k not in task.site_options}
    return RunIdentity(config.task, shaping, config.seed, config.strategy, config.fragments)


def streaming(config: ServerConfig, model: GlobalModel) -> Fragments | None:
    """The run's streaming fragments (None for --fragments 1), known to the model's
    downloads; ConfigError for more fragments than the model has tensors."""
    if config.fragments == 1:
        return None
    count = len(model.manifest.entries)
    if config.fragments > count:
        raise ConfigError(
            f"fragments: {config.fragments} is more than the {count} tensors exchanged"
        )
    model.fragments = Fragments(model.manifest, config.fragments, config.fragment_alpha)
    return model.fragments


def assemble(
    config: ServerConfig,
    task: Task | None = None,
    strategy: Strategy | None = None,
    clock: Clock | None = None,
) -> Coordinator:
    """The coordinator of the run `config` describes, restored from its run directory
    (or at round 0). `task`, `strategy` and `clock` replace what `config` names, for a
    test or an embedding program."""
    task = task or load_task(config.task, config.task_opt, config.seed)
    type(task).check_round_config(config.task, config.round_config)
    strategy = strategy or with_privacy(build_strategy(config), config, config.fraction)
    clock = clock or MonotonicClock()
    # The run directory's lock first: nothing touches a directory another coordinator runs.
    store = RunStore(config.run_dir, run_identity(config, task), keep=config.keep_checkpoints)
    store.run_id = RunFile(config.run_dir).run_id()  # a restart carries on the same run
    module = task.build_model()
    model = GlobalModel(module, exchanged_names(task, module))
    fragments = streaming(config, model)
    if fragments is not None:
        strategy = fragmented(strategy, fragments)
    intake = UploadIntake(
        config,
        model.manifest,
        config.spool_path,
        min_rate=config.min_transfer_rate,
        window=config.transfer_window,
        max_uploads=config.max_uploads,
        fragments=fragments,
    )
    safeguards = Safeguards(config)
    resumed = restore(model, strategy, store, config.init_weights)
    summary = f"task {config.task}, {model.summary()}, uplink {intake.uplink.spec}"
    if fragments is not None:
        summary += f", streaming in {fragments.summary()}"
    if resumed is None:
        log.info("new run in %s: %s", config.run_dir, summary)
    else:
        where = f"{config.run_dir} at round {resumed} of {config.rounds}"
        log.info("resumed %s: %s", where, summary)
    return Coordinator(
        task=task,
        model=model,
        strategy=strategy,
        store=store,
        admission=Admission(
            config,
            config,
            config.task,
            model.manifest.digest(),
            clock.now,
            Agreement(task.agreed_options(), config.seed),
        ),
        intake=intake,
        safeguards=safeguards,
        aggregation=GuardedAggregate(strategy, safeguards, model, store, task),
        clock=clock,
        rounds=config,
        evaluation=config,
        transport=config,
        completed=resumed or 0,
        round_log=RoundLog(
            config.run_dir,
            {**vars(store.identity), "run_id": store.run_id},
            fsync=config.round_log_fsync,
        ),
        partials=PartialUploads(config.partial_upload_seconds, config.partial_upload_bytes),
    )
