"""What a site's ranks other than rank 0 do: follow rank 0's commands (site.py).

They never talk to the coordinator. For each TRAIN or EVALUATE that rank 0 sends, they
receive the round's task and the global model, do the same step on their own shard of
the site's data as rank 0 does on its own (steps.py), and add their share to the site's
total; at END they exit with rank 0's exit code.
"""

from __future__ import annotations

import logging

from fedstream.client import steps
from fedstream.client.site import Command, Site
from fedstream.common.progress import progress_view
from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.tasks import Task

log = logging.getLogger(__name__)


def follow(site: Site, task: Task) -> int:
    """Do rank 0's bidding until it ends the run; the exit code it ends with."""
    model, layout = site.build(task)
    trained = site.wrap(model)
    progress = progress_view(log, None)
    while True:
        command, payload = site.receive()
        if command == Command.END:
            code = int(payload.decode() or 0)
            log.info("rank 0 ended the run (exit code %d)", code)
            return code
        if command == Command.TRAIN:
            train_task = pb.TrainTask.FromString(payload)
            plan = steps.read_round_config(train_task)
            site.share_model(model, layout)
            result = steps.train(task, trained, plan, train_task.round, progress)
            site.total(result.num_examples, result.metrics)
            site.collect(model, layout, plan.gradient)  # fsdp: rank 0 gathers the model
        elif command == Command.EVALUATE:
            evaluate_task = pb.EvaluateTask.FromString(payload)
            site.share_model(model, layout)
            site.total_report(steps.evaluate(task, model, evaluate_task))
