"""Tasks: the interface a user implements (the model and the data, free of any transport or
federation code) and the built-in tasks. Both the coordinator and the client import this
package; they never import each other.

The built-in tasks run with no download: `digits` (an MLP on scikit-learn's digits),
`charlm` and `charlm-lora` (a small character-level GPT on CPython's pydoc topics, fully
or through LoRA adapters), `hf-causal-lm` (a transformers GPT-2 or Llama on the same text,
fully or through PEFT adapters; needs the `hf` extra) and `synthetic` (weights of any
size, for benchmarks).
"""

from fedstream.tasks.options import TaskOption
from fedstream.tasks.task import (
    BUILTIN_TASKS,
    ConfigScalar,
    EvalResult,
    Task,
    TaskError,
    TrainResult,
    exchanged_names,
    load_task,
    resolve_task_class,
)

__all__ = [
    "BUILTIN_TASKS",
    "ConfigScalar",
    "EvalResult",
    "Task",
    "TaskError",
    "TaskOption",
    "TrainResult",
    "exchanged_names",
    "load_task",
    "resolve_task_class",
]
