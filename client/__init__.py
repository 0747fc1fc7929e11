"""The fedstream client process: join, pull, train, push, reconnect.

    process.py     a client process: a site's launcher, or one rank; main()
    loop.py        the life cycle on rank 0 (join, poll, pull, train or evaluate, push)
    follower.py    the loop of a site's other ranks
    site.py        a site of several ranks: process group, model shared inside, DDP
    sharded.py     an FSDP site: scattered in, gathered out one tensor at a time
    launch.py      --nproc-per-node: torch's own launcher on the same command line
    steps.py       local work on the held model: round config, training, evaluation
    connection.py  the control and bulk channels and the calls over them
    session.py     the session a Join opens, and the heartbeat that keeps it in a round
    transfers.py   download with resume and stall watchdog; upload
    retry.py       what a failed call means (retry, wait, refuse) and Backoff
    held_model.py  the downloaded global model, on disk, and deltas against it
    uplink.py      the update encoded as the round's uplink codec asks
    config.py      ClientConfig, the client's options

`Task` and its result types are re-exported from `fedstream.tasks`, where they live, so
that a user's task can subclass `fedstream.client.Task`.
"""

from fedstream.tasks import ConfigScalar, EvalResult, Task, TrainResult

__all__ = ["ConfigScalar", "EvalResult", "Task", "TrainResult"]
