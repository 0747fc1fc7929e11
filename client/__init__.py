"""The fedstream client process: join, pull, train, push, reconnect.

`Task` and its result types are re-exported from `fedstream.tasks`, where they live, so
that a user's task can subclass `fedstream.client.Task`.
"""

from fedstream.tasks import ConfigScalar, EvalResult, Task, TrainResult

__all__ = ["ConfigScalar", "EvalResult", "Task", "TrainResult"]
