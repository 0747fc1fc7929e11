"""`fedstream new task NAME`: a project to start a user's own task from.

    NAME/                 the project (run everything from here)
      NAME/task.py        a Task subclass: a small classifier on each site's own CSV file
      tests/test_task.py  its test (python -m unittest: nothing to install)
      data/*.csv          sample files: one per site, and the coordinator's held-out one
      README.md           the commands below

The commands to test it, run a server and two clients, and export the model are printed
and written to the project's README.md.
"""

from __future__ import annotations

import keyword
import random
import shlex
from dataclasses import dataclass
from pathlib import Path

from fedstream.common.config import ConfigError

KINDS = ("task",)
SAMPLE_FEATURES = 4
SAMPLE_CLASSES = 3
SAMPLE_ROWS = 120


@dataclass
class NewConfig:
    kind: str = "task"
    """What to make: `task` (a package with your own Task, its test and sample data)."""
    name: str = ""
    """The package's name, a Python identifier such as `mytask`."""
    dir: Path = Path(".")
    """Folder the project directory NAME/ is made in."""

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind: fedstream new makes {', '.join(KINDS)}, not {self.kind!r}")
        if not self.name.isidentifier() or keyword.iskeyword(self.name):
            raise ConfigError(f"name {self.name!r} is not a Python identifier (say, mytask)")


def class_name(name: str) -> str:
    """`my_task` -> `MyTaskTask`."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part) + "Task"


def commands(name: str) -> list[str]:
    """What a user runs from the project directory, in order (server and each client in
    a terminal of its own)."""
    task = f"{name}.task:{class_name(name)}"
    run = f"PYTHONPATH=. fedstream {{}} --task {task} --task-opt data=data/{{}}.csv"
    return [
        "python -m unittest discover -s tests -v",
        run.format("server", "heldout") + f" --rounds 2 --run-dir runs/{name}",
        run.format("client", "site-0") + " --name site-0",
        run.format("client", "site-1") + " --name site-1",
        f"PYTHONPATH=. fedstream export runs/{name} --out {name}.pt",
    ]


TASK_TEMPLATE = '''"""{cls}: a small classifier on each site's own CSV file, as a fedstream Task.

Each row of a CSV file holds the features, then the integer class label last; a header
line is skipped. The coordinator and every client name their own file with
`--task-opt data=PATH`: `data` is a site option (`site_options`), so it differs from
site to site and is not part of the run's identity. The coordinator's file is held-out
data for `evaluate`; a client's is what it trains on, and never leaves it.

Replace the model and the reading of the data with your own: fedstream calls
`build_model` (every process, the same seed), `load_data` (a client, once), `train`
(a client, each round) and `evaluate` (the coordinator, after each round). Nothing
else calls `model.train()` or `model.eval()`: the methods below do.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fedstream.tasks import ConfigScalar, EvalResult, Task, TaskError, TrainResult


def read_csv(path: Path, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32) and labels (int64) of a CSV file; TaskError when unusable."""
    if not path.is_file():
        raise TaskError(f"data file {{path}} does not exist")
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    try:
        values = [[float(cell) for cell in row] for row in rows[1:]]
    except ValueError as exc:
        raise TaskError(f"data file {{path}}: {{exc}}") from None
    if not values or any(len(row) != features + 1 for row in values):
        raise TaskError(f"data file {{path}}: expected rows of {{features}} features and a label")
    table = torch.tensor(values)
    return table[:, :-1].contiguous(), table[:, -1].long()


class {cls}(Task):
    """Options: `data` (this site's CSV file), `features` ({features}), `classes`
    ({classes}), `hidden` (32). Round config: `lr` (0.05), `local_epochs` (5),
    `batch_size` (16)."""

    site_options = frozenset({{"data"}})

    def __init__(self, options: Mapping[str, str] | None = None, seed: int = 0) -> None:
        super().__init__(options, seed)
        self.features = self.int_option("features", {features})
        self.classes = self.int_option("classes", {classes})
        self.hidden = self.int_option("hidden", 32)
        data = self.option("data", "")
        self.data = Path(data) if data else None
        if self.data is not None and not self.data.is_file():
            raise TaskError(f"data file {{self.data}} does not exist")
        self.x = torch.empty(0, self.features)
        self.y = torch.empty(0, dtype=torch.long)

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)  # the same initial weights in every process
        return nn.Sequential(
            nn.Linear(self.features, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.classes)
        )

    def load_data(self, partition: int, num_partitions: int) -> None:
        # A site trains on its own file; --partition only splits the built-in tasks' data.
        if self.data is None:
            raise TaskError("give this site's data file: --task-opt data=PATH")
        self.x, self.y = read_csv(self.data, self.features)

    def train(self, model: nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=float(config.get("lr", 0.05)))
        batch = int(config.get("batch_size", 16))
        generator = torch.Generator().manual_seed(self.seed + int(config.get("round", 0)))
        total = 0.0
        steps = 0
        for _ in range(int(config.get("local_epochs", 5))):
            for index in torch.randperm(len(self.y), generator=generator).split(batch):
                x, y = self.x[index].to(self.device), self.y[index].to(self.device)
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
                steps += 1
        return TrainResult(num_examples=len(self.y), metrics={{"loss": total / max(1, steps)}})

    def evaluate(self, model: nn.Module) -> EvalResult | None:
        # The coordinator's held-out file, when it was given one.
        if self.data is None:
            return None
        x, y = read_csv(self.data, self.features)
        model.eval()
        with torch.no_grad():
            logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
        return EvalResult(num_examples=len(y), metrics={{"loss": loss, "accuracy": accuracy}})
'''

TEST_TEMPLATE = '''"""{cls}: training lowers the held-out loss; a missing data file is refused.

Plain unittest, so it runs where fedstream runs with nothing more installed
(`python -m unittest discover -s tests -v`); pytest runs it too.
"""

import unittest
from pathlib import Path

from fedstream.tasks import TaskError
from {name}.task import {cls}

DATA = Path(__file__).resolve().parents[1] / "data"


class {cls}Test(unittest.TestCase):
    def test_a_round_of_training_lowers_the_held_out_loss(self) -> None:
        task = {cls}({{"data": str(DATA / "site-0.csv")}})
        task.load_data(0, 1)
        model = task.build_model()
        held_out = {cls}({{"data": str(DATA / "heldout.csv")}})
        before = held_out.evaluate(model)
        result = task.train(model, {{"lr": 0.05, "local_epochs": 5}})
        after = held_out.evaluate(model)
        assert before is not None and after is not None
        self.assertGreater(result.num_examples, 0)
        self.assertLess(after.metrics["loss"], before.metrics["loss"])

    def test_a_missing_data_file_is_a_task_error(self) -> None:
        with self.assertRaisesRegex(TaskError, "does not exist"):
            {cls}({{"data": str(DATA / "nowhere.csv")}})


if __name__ == "__main__":
    unittest.main()
'''

README_TEMPLATE = """# {name}

A fedstream task of your own: `{name}/task.py` ({cls}), a small classifier on each
site's own CSV file (`data/`: `site-0.csv` and `site-1.csv` for two clients,
`heldout.csv` for the coordinator's evaluation). Replace the model and the data with
yours; `--task-opt data=PATH` is each site's own file (a site option: it may differ
everywhere).

From this directory, each long-running command in a terminal of its own:

```
{commands}
```

The server writes `runs/{name}/` (checkpoints, metrics.jsonl, metrics.png); the last
command writes the trained model as a plain state dict:
`{cls}().build_model().load_state_dict(torch.load("{name}.pt"), strict=True)`.
"""


def sample_rows(rng: random.Random, classes: list[int], rows: int) -> list[str]:
    """`rows` CSV lines drawn around one centre per class: class c at c on every axis."""
    lines = []
    for _ in range(rows):
        label = rng.choice(classes)
        cells = [f"{label + rng.gauss(0.0, 0.6):.4f}" for _ in range(SAMPLE_FEATURES)]
        lines.append(",".join([*cells, str(label)]))
    return lines


def write_sample_data(folder: Path, seed: int = 0) -> None:
    """Two sites with skewed classes (non-IID) and a held-out file with all of them."""
    rng = random.Random(seed)
    header = ",".join([*(f"x{i}" for i in range(SAMPLE_FEATURES)), "label"])
    files = {"site-0": [0, 0, 1, 2], "site-1": [1, 2, 2, 0], "heldout": [0, 1, 2]}
    folder.mkdir(parents=True)
    for stem, classes in files.items():
        lines = [header, *sample_rows(rng, classes, SAMPLE_ROWS)]
        (folder / f"{stem}.csv").write_text("\n".join(lines) + "\n")


def scaffold(config: NewConfig) -> Path:
    """Make the project; its directory."""
    root = config.dir / config.name
    if root.exists():
        raise ConfigError(f"{root} already exists: choose another name or --dir")
    values = {
        "name": config.name,
        "cls": class_name(config.name),
        "features": SAMPLE_FEATURES,
        "classes": SAMPLE_CLASSES,
    }
    package = root / config.name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f'"""{values["cls"]}: a fedstream task."""\n')
    (package / "task.py").write_text(TASK_TEMPLATE.format(**values))
    (root / "tests").mkdir()
    (root / "tests" / "test_task.py").write_text(TEST_TEMPLATE.format(**values))
    write_sample_data(root / "data")
    listing = "\n".join(commands(config.name))
    (root / "README.md").write_text(README_TEMPLATE.format(commands=listing, **values))
    return root


def main(config: NewConfig) -> int:
    root = scaffold(config)
    print(f"fedstream new: made {root}/ with task {config.name}.task:{class_name(config.name)}")
    print(f"run these from {shlex.quote(str(root))} (server and clients each in a terminal):")
    for line in commands(config.name):
        print(f"  {line}")
    return 0
