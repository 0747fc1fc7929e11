"""The fedstream client process: join, pull, train, push, reconnect.

    loop.py        the life cycle (join, poll, pull, train or evaluate, push) and main()
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
