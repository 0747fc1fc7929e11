"""Declared task options and round settings (tasks/options.py): a typo or a value of the
wrong type is refused naming what is known; a task that declares nothing is taken as it
was before declarations existed."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from fedstream.common.wire.manifest import Manifest
from fedstream.tasks import (
    BUILTIN_TASKS,
    ConfigScalar,
    Task,
    TaskError,
    TaskOption,
    TrainResult,
    exchanged_names,
    load_task,
    resolve_task_class,
)
from fedstream.tasks.digits import DigitsTask
from fedstream.tasks.task import task_help

DECLARING = ["digits", "charlm", "charlm-lora", "synthetic"]


class Undeclared(Task):
    """A user's task as written before declarations: it reads whatever keys it likes."""

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(2, 2)

    def load_data(self, partition: int, num_partitions: int) -> None:
        pass

    def train(self, model: torch.nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        return TrainResult(1)


class MyDigits(DigitsTask):
    """A subclass of a built-in task with an option of its own, declaring nothing itself."""


def layout(task: Task) -> str:
    model = task.build_model()
    return Manifest.of_model(model.state_dict(), exchanged_names(task, model)).digest()


def test_an_unknown_option_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(TaskError) as info:
        load_task("digits", {"hiddn": "64"})
    assert str(info.value) == (
        "task digits has no option 'hiddn': known options are alpha, hidden, partition_seed"
    )


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("digits", {"hidden": "6x"}, "task digits option hidden='6x' is not an integer"),
        ("digits", {"alpha": "half"}, "task digits option alpha='half' is not a number"),
        ("synthetic", {"layers": "2.5"}, "task synthetic option layers='2.5' is not an integer"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(
    name: str, options: dict[str, str], message: str
) -> None:
    with pytest.raises(TaskError, match="^" + message.replace("(", r"\(") + "$"):
        load_task(name, options)


def test_integers_keep_their_exponent_notation() -> None:
    assert load_task("synthetic", {"params": "1e5", "layers": "2"}).params == 100_000  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", DECLARING)
def test_every_builtin_task_but_hf_declares_its_options_and_round_settings(name: str) -> None:
    cls = resolve_task_class(name)
    assert cls.checked_options() and cls.checked_round_settings()
    assert "lr" in {s.name for s in cls.checked_round_settings()}


@pytest.mark.parametrize("name", DECLARING)
def test_declared_defaults_are_the_defaults_the_task_uses(name: str) -> None:
    """Giving every declared default explicitly builds the model that no options build."""
    cls = resolve_task_class(name)
    defaults = {
        o.name: str(int(o.default) if isinstance(o.default, bool) else o.default)
        for o in cls.checked_options()
        if o.default is not None
    }
    if name == "synthetic":
        defaults["params"] = "20000"  # small, and the same on both sides
    base = {"params": "20000"} if name == "synthetic" else {}
    assert layout(load_task(name, defaults)) == layout(load_task(name, base))
    assert load_task(name, defaults).agreed_options() == load_task(name, base).agreed_options()


def test_a_task_that_declares_nothing_takes_any_key() -> None:
    task = Undeclared({"anything": "goes"})
    assert task.options == {"anything": "goes"}
    Undeclared.check_round_config("mine", {"whatever": "1"})
    assert task.agreed_options() == {"anything": "goes"}


def test_a_subclass_that_declares_nothing_itself_keeps_todays_permissive_behaviour() -> None:
    assert MyDigits.checked_options() == ()
    assert MyDigits({"attack": "none"}).hidden == 128


def test_round_settings_are_checked_by_name_and_type() -> None:
    DigitsTask.check_round_config("digits", {"lr": "0.05", "local_epochs": "3"})
    with pytest.raises(TaskError) as info:
        DigitsTask.check_round_config("digits", {"lr": "abc"})
    assert str(info.value) == "--round-config: task digits setting lr='abc' is not a number"
    with pytest.raises(TaskError) as info:
        DigitsTask.check_round_config("digits", {"lrr": "0.1"})
    assert str(info.value) == (
        "--round-config: task digits has no setting 'lrr': known settings are batch_size, "
        "local_epochs, lr, proximal_mu"
    )


def test_agreed_options_are_canonical_and_leave_out_site_options() -> None:
    class Site(DigitsTask):
        declared_options = DigitsTask.declared_options + (TaskOption("data", str, None, "x"),)
        site_options = frozenset({"data"})

    given = Site({"hidden": "128.0", "data": "/a"}).agreed_options()
    assert given == Site({"data": "/b"}).agreed_options()
    assert given == {"alpha": "0.5", "hidden": "128"}
    assert Site({"hidden": "64"}).agreed_options()["hidden"] == "64"


def test_help_task_lists_options_with_types_and_defaults() -> None:
    text = task_help("digits")
    assert "task digits options (--task-opt KEY=VALUE):" in text
    assert "hidden" in text and "integer, default 128" in text
    assert "lr" in text and "number, default 0.1" in text
    undeclared = task_help(f"{__name__}:Undeclared")
    assert "declares no options: any --task-opt KEY=VALUE is passed on" in undeclared


def test_hf_causal_lm_is_a_builtin_that_may_declare_later() -> None:
    """Declarations work for any Task class: hf-causal-lm is still permissive here."""
    assert "hf-causal-lm" in BUILTIN_TASKS


def test_hf_causal_lm_declares_its_options_and_round_settings() -> None:
    pytest.importorskip("transformers")
    with pytest.raises(TaskError, match="no option 'lorra'.*lora_rank"):
        load_task("hf-causal-lm", {"lorra": "1"})
    task_class = type(load_task("hf-causal-lm", {"n_layer": "1", "n_embd": "32"}))
    assert {o.name for o in task_class.round_settings} >= {"lr", "local_steps", "total_rounds"}
    assert "data" in task_class.site_options
