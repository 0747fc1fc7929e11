"""The Task interface: the user's model and data, free of any transport or federation code.

A Task is named on the command line either by a built-in short name (`digits`, `charlm`,
`synthetic`) or by import path (`package.module:ClassName`), and constructed with its
options as strings (`--task-opt KEY=VALUE`), which it parses itself.

The same Task class runs on both sides: the coordinator calls `build_model` for the initial
weights and `evaluate` on its held-out split; a client calls `load_data` for its private
partition and `train` each round, `compute_gradient` instead when the strategy is FedSGD
(round config `mode = "gradient"`), and `evaluate_local` in federated evaluation rounds.
`fedstream export` calls `build_model`, then `merge_adapters` or `save_pretrained`.

Nothing in fedstream calls `model.train()` or `model.eval()`: a task's `train` and
`compute_gradient` put the model in training mode themselves, and its `evaluate` and
`evaluate_local` in evaluation mode (dropout, batch norm).

A Task class declares its options in `declared_options` and its round settings in
`round_settings` (`fedstream.tasks.options`): then an unknown key or a value of the wrong
type is refused before anything runs, and `--help-task` lists them. A class that declares
none itself takes any key, as it reads them: a subclass of a built-in task that reads
options of its own keeps working until it declares them all.

Options named in a Task class's `site_options` (say, the path of a site's own data) may
differ from process to process: they are not part of the run's identity on resume, and
never shape the model. Every other option, with the seed, must agree between the
coordinator and its clients, and is checked when a client joins.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from fedstream.common.errors import TaskError
from fedstream.common.round_config import ConfigScalar
from fedstream.tasks.options import TaskOption, agreed_values, check_values, options_text

__all__ = [
    "ConfigScalar",
    "EvalResult",
    "Task",
    "TaskError",
    "TaskOption",
    "TrainResult",
    "load_task",
]

BUILTIN_TASKS: dict[str, str] = {
    "digits": "fedstream.tasks.digits:DigitsTask",
    "charlm": "fedstream.tasks.charlm:CharLMTask",
    "charlm-lora": "fedstream.tasks.charlm_lora:CharLMLoRATask",
    "hf-causal-lm": "fedstream.tasks.hf_causal_lm:HFCausalLMTask",
    "synthetic": "fedstream.tasks.synthetic:SyntheticTask",
}


@dataclass
class TrainResult:
    """What one round of local training reports back."""

    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Metrics of a model on some data; `loss` always, `accuracy` where it means something."""

    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Task(ABC):
    """A model and the data to train it on; subclass this to plug in your own."""

    site_options: ClassVar[frozenset[str]] = frozenset()
    """Option keys that are each site's own (a data path): they may differ between the
    coordinator and every client, and do not count toward the run's identity on resume."""

    declared_options: ClassVar[tuple[TaskOption, ...]] = ()
    """The `--task-opt` keys this task reads; empty: any key is taken (see the module
    docstring)."""

    round_settings: ClassVar[tuple[TaskOption, ...]] = ()
    """The `--round-config` keys `train` and `compute_gradient` read; empty: any key."""

    @classmethod
    def checked_options(cls) -> tuple[TaskOption, ...]:
        """The options this class declares itself (not inherited): what is checked."""
        return tuple(cls.__dict__.get("declared_options", ()))

    @classmethod
    def checked_round_settings(cls) -> tuple[TaskOption, ...]:
        """The round settings this class declares itself (not inherited): what is checked."""
        return tuple(cls.__dict__.get("round_settings", ()))

    progress_hook: Callable[[int, int], None] | None = None
    """Where `report_progress` goes: set by the client process to its progress display."""

    def __init__(self, options: Mapping[str, str] | None = None, seed: int = 0) -> None:
        self.options: dict[str, str] = dict(options or {})
        self.seed = seed
        self.device = torch.device("cpu")

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A freshly initialised model; deterministic given `self.seed`."""

    @abstractmethod
    def load_data(self, partition: int, num_partitions: int) -> None:
        """Load this client's private share: partition `partition` of `num_partitions`."""

    @abstractmethod
    def train(self, model: torch.nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        """Train `model` in place on the loaded partition for one round."""

    def evaluate(self, model: torch.nn.Module) -> EvalResult | None:
        """Evaluate on the task's held-out split, or None when the task has none."""
        return None

    def exchanged_parameters(self, model: torch.nn.Module) -> list[str] | None:
        """Names of the state-dict tensors of `model` that travel and are aggregated.

        None (the default) exchanges every floating-point tensor. The others never leave
        a process: each side keeps them as `build_model` made them, so they must come
        out the same everywhere (a frozen base model, say, under LoRA adapters).
        """
        return None

    def compute_gradient(
        self, model: torch.nn.Module, config: Mapping[str, ConfigScalar]
    ) -> TrainResult:
        """Leave in each parameter's `.grad` the gradient of the mean loss over this round's
        local batches, without changing the weights (FedSGD); the client uploads it."""
        raise TaskError(f"task {type(self).__name__} does not compute gradients (FedSGD)")

    def forget_optimizer_state(self) -> None:  # noqa: B027 (most tasks keep none)
        """Drop any optimiser state kept across rounds (`keep_optimizer`): the client's
        model was just reset to the global one (a streaming client catching up), and
        moments of the weights it had would not fit the weights it has."""

    def evaluate_local(self, model: torch.nn.Module) -> EvalResult | None:
        """Evaluate on this client's own held-out data (federated evaluation), or None when
        the client keeps none."""
        return None

    def merge_adapters(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model with any adapters merged into its base weights (default: the model
        itself)."""
        return model

    def save_pretrained(
        self, model: torch.nn.Module, directory: Path, *, merge_adapters: bool
    ) -> None:
        """Write the model in the task's own pretrained format (a directory); `fedstream
        export` calls it for an output path without a .pt/.pth/.safetensors suffix."""
        raise TaskError(
            f"task {type(self).__name__} has no pretrained directory format: export to a "
            "file ending in .pt, .pth or .safetensors"
        )

    def report_progress(self, done: int, total: int) -> None:
        """Step `done` of `total` of the training in progress, for the person watching.

        Optional: a task that never calls it is shown as training, without a bar."""
        if self.progress_hook is not None:
            self.progress_hook(done, total)

    @classmethod
    def check_round_config(cls, name: str, settings: Mapping[str, str]) -> None:
        """TaskError for a `--round-config` key this class does not declare (when it
        declares any) or a value of the wrong type: the coordinator checks its settings
        before any client sees them."""
        check_values(
            f"--round-config: task {name}", cls.checked_round_settings(), settings, "setting"
        )

    def agreed_options(self) -> dict[str, str]:
        """The options every process of the run must share: all but the site options, as
        canonical text (`fedstream.tasks.options.agreed_values`); checked at Join."""
        cls = type(self)
        return agreed_values(cls.checked_options(), self.options, cls.site_options)

    def option(self, key: str, default: str) -> str:
        return self.options.get(key, default)

    def int_option(self, key: str, default: int) -> int:
        """Option `key` as an integer (`1e3` allowed); TaskError naming it when it is not."""
        value = self.option(key, str(default))
        try:
            number = float(value)
        except ValueError:
            raise TaskError(f"task option {key}={value!r} is not an integer") from None
        if not number.is_integer():
            raise TaskError(f"task option {key}={value!r} is not an integer")
        return int(number)

    def float_option(self, key: str, default: float) -> float:
        """Option `key` as a number; TaskError naming it when it is not."""
        value = self.option(key, str(default))
        try:
            return float(value)
        except ValueError:
            raise TaskError(f"task option {key}={value!r} is not a number") from None


def exchanged_names(task: Task, model: torch.nn.Module) -> list[str]:
    """The exchanged tensors of `model`, in state-dict order (see `exchanged_parameters`)."""
    state = model.state_dict()
    names = task.exchanged_parameters(model)
    if names is None:
        return [name for name, tensor in state.items() if tensor.is_floating_point()]
    wanted = set(names)
    unknown = sorted(wanted - state.keys())
    if unknown:
        raise TaskError(f"exchanged parameters not in the model: {', '.join(unknown[:5])}")
    if not all(state[name].is_floating_point() for name in wanted):
        raise TaskError("exchanged parameters must be floating-point tensors")
    return [name for name in state if name in wanted]


def resolve_task_class(name: str) -> type[Task]:
    """Find a Task class by built-in short name or `package.module:ClassName`."""
    path = BUILTIN_TASKS.get(name, name)
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        known = ", ".join(sorted(BUILTIN_TASKS))
        raise TaskError(f"unknown task {name!r}: use one of {known} or 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"cannot import task module {module_name!r}: {exc}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(f"{path!r} is not a fedstream Task subclass")
    return cls


def task_help(name: str) -> str:
    """What `--help-task` prints: the task's declared options and round settings."""
    cls = resolve_task_class(name)
    text = options_text(name, cls.checked_options(), cls.checked_round_settings())
    if cls.site_options:
        text += f"\nsite options (may differ per process): {', '.join(sorted(cls.site_options))}"
    return text


def load_task(name: str, options: Mapping[str, str] | None = None, seed: int = 0) -> Task:
    """Construct the named task with its options; TaskError for an option it does not
    declare (when it declares any), a value of the wrong type, or a file it cannot read."""
    cls = resolve_task_class(name)
    check_values(f"task {name}", cls.checked_options(), options or {})
    try:
        return cls(options, seed)
    except OSError as exc:
        raise TaskError(f"task {name}: {exc}") from None
