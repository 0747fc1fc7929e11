"""Built-in task `hf-causal-lm`: a Hugging Face transformers causal language model, fully
or through PEFT LoRA adapters (`pip install 'fedstream[hf]'`). The recipe of a LoRA
fine-tune across sites is docs/llm-finetuning.md.

The model is built from a config (`arch=gpt2` or `arch=llama`, small by default, any
size by options) under the run's seed, so every process builds the same one, or loaded
from a local directory (`model_dir=PATH`, anything `AutoModelForCausalLM.from_pretrained`
reads; nothing is downloaded) with the tokenizer saved beside it
(`fedstream.tasks.hf_tokens`). A model built from a config has byte tokens
(`fedstream.tasks.bytetext`).

The data is a site's own file (`data=PATH`: JSON lines, Parquet, CSV, text or a saved
`datasets` directory, as plain text, prompt/response or chat messages; see
`fedstream.tasks.hf_data`), or, without one, CPython's pydoc topics dealt to clients by
partition, or a site's plain text file (`text=PATH`, whose last tenth is held out).

With `lora=1` the model is wrapped by PEFT (`LoraConfig`; Hu et al., "LoRA: Low-Rank
Adaptation of Large Language Models", ICLR 2022): the base is frozen, and only the
adapters' A and B matrices are exchanged, aggregated and checkpointed. Training itself
(precision, accumulation, schedule, the optimiser kept across rounds) is
`fedstream.tasks.hf_training`.

`save_pretrained` writes what `from_pretrained` reads back, tokenizer included: the model
(adapters merged into it on request) for `AutoModelForCausalLM`, or the adapters for
`PeftModel` with the base they belong to named as the user chooses.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from fedstream.tasks import ConfigScalar, EvalResult, Task, TaskError, TrainResult
from fedstream.tasks.bytetext import encode_bytes, eval_windows, split_topics, window_batches
from fedstream.tasks.hf_config import model_config
from fedstream.tasks.hf_options import MODEL_OPTIONS, ROUND_SETTINGS, SITE_OPTIONS
from fedstream.tasks.hf_tokens import byte_tokenizer, check_vocabulary, load_tokenizer
from fedstream.tasks.hf_training import LocalTrainer, TrainOptions, autocast, token_loss
from fedstream.tasks.options import TaskOption
from fedstream.tasks.training import check_partition, derive_seed, evaluating, seeded_rng

try:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )
except ImportError as exc:
    raise ImportError(
        f"hf-causal-lm needs transformers and peft: pip install 'fedstream[hf]' ({exc})"
    ) from exc

from fedstream.tasks.hf_data import Batch, DataOptions, Rows, load_rows  # noqa: E402

VOCAB_SIZE = 256
"""Byte tokens."""
TEXT_HELDOUT_FRACTION = 0.1
"""The tail of a site's own text file kept for evaluation."""
EVAL_BATCH = 16
"""Held-out rows scored at once."""
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
"""Default adapted layers by model type: every projection of attention and MLP (for other
model types, PEFT's own defaults)."""
INIT_RANGE = 0.1
"""The standard deviation of a config-built model's initial weights (transformers' default
is 0.02, chosen for widths of 768 and more). The output layer (GPT-2: the token embedding)
projects a normalised hidden state of norm about sqrt(n_embd), so its logits have a std of
about init_range * sqrt(n_embd): 0.23 at 0.02 and the default width of 128, too little to
leave the uniform distribution when LoRA freezes that layer (held-out loss levels off after
one round), about 1.1 at 0.1 (close to 1 / sqrt(128)), where LoRA keeps learning and the
full model learns faster too."""
BASE_DIR = "base"
"""Where an adapter export keeps a base model built from a config (no directory had it)."""


class HFCausalLMTask(Task):
    """A causal language model of transformers: its options, site options and round
    settings are declared in `tasks/hf_options.py` (`fedstream server --task hf-causal-lm
    --help-task` lists them); the data formats are `tasks/hf_data.py`'s, the training
    options `tasks/hf_training.py`'s."""

    declared_options: ClassVar[tuple[TaskOption, ...]] = MODEL_OPTIONS + SITE_OPTIONS
    round_settings: ClassVar[tuple[TaskOption, ...]] = ROUND_SETTINGS
    site_options: ClassVar[frozenset[str]] = frozenset(o.name for o in SITE_OPTIONS)

    def __init__(self, options: Mapping[str, str] | None = None, seed: int = 0) -> None:
        super().__init__(options, seed)
        try:
            self.arch = self.option("arch", "gpt2")
            self.model_dir = self.options.get("model_dir")
            self.block_size = self.int_option("block_size", 64)
            self.max_seq_len = self.int_option("max_seq_len", self.block_size)
            self.lora = bool(self.int_option("lora", 0))
            self.lora_rank = self.int_option("lora_rank", 4)
            self.lora_alpha = self.int_option("lora_alpha", 2 * self.lora_rank)
            self.lora_dropout = self.float_option("lora_dropout", 0.0)
            self.init_range = self.float_option("init_range", INIT_RANGE)
            self.config = None if self.model_dir else model_config(self, VOCAB_SIZE)
        except ValueError as exc:
            raise TaskError(f"hf-causal-lm options: {exc}") from exc
        if self.block_size < 1 or self.lora_rank < 1 or not self.init_range > 0:
            raise TaskError("hf-causal-lm needs block_size >= 1, lora_rank >= 1 and init_range > 0")
        if self.max_seq_len < 2 or (self.config is not None and self.max_seq_len > self.block_size):
            raise TaskError(
                f"hf-causal-lm max_seq_len must be 2..block_size ({self.block_size}), "
                f"got {self.max_seq_len}"
            )
        self.lora_targets = _names(self.options.get("lora_targets"))
        self.text = Path(self.options["text"]) if "text" in self.options else None
        self.data = Path(self.options["data"]) if "data" in self.options else None
        self.data_options = self._data_options()
        self.trainer = LocalTrainer(
            TrainOptions(
                precision=self.option("precision", "fp32"),
                grad_accum=self.int_option("grad_accum", 1),
                grad_checkpointing=bool(self.int_option("grad_checkpointing", 0)),
                keep_optimizer=bool(self.int_option("keep_optimizer", 0)),
            )
        )
        self.partition = 0
        self._tokens: torch.Tensor | None = None
        self._heldout: torch.Tensor | None = None
        self._rows: Rows | None = None
        self._eval_rows: Rows | None = None
        self._data_loaded = False

    def _data_options(self) -> DataOptions:
        pack = self.options.get("pack")
        return DataOptions(
            max_seq_len=self.max_seq_len,
            data_format=self.options.get("data_format"),
            text_field=self.option("text_field", "text"),
            prompt_field=self.option("prompt_field", "prompt"),
            response_field=self.option("response_field", "response"),
            messages_field=self.option("messages_field", "messages"),
            pack=None if pack is None else bool(self.int_option("pack", 0)),
            eval_fraction=self.float_option("eval_fraction", 0.1),
        )

    @functools.cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """`model_dir`'s own tokenizer, or byte tokens for a model built from a config."""
        return load_tokenizer(self.model_dir) if self.model_dir else byte_tokenizer()

    def _base_model(self) -> PreTrainedModel:
        """The model without adapters: from `model_dir`, or from the config under the seed."""
        if not self.model_dir:
            with seeded_rng(self.seed):
                return AutoModelForCausalLM.from_config(self.config)
        try:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TaskError(f"hf-causal-lm model_dir {self.model_dir}: {first}") from None
        where = f"model_dir {self.model_dir}"
        embeddings = model.get_input_embeddings()
        assert isinstance(embeddings, nn.Embedding), type(embeddings)
        check_vocabulary(self.tokenizer, embeddings.num_embeddings, where)
        positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if isinstance(positions, int) and self.max_seq_len > positions:
            raise TaskError(
                f"hf-causal-lm {where}: max_seq_len {self.max_seq_len} is more than the "
                f"model's {positions} positions"
            )
        return model

    def build_model(self) -> nn.Module:
        model = self._base_model()
        if not self.lora:
            return model
        model_type = model.config.model_type
        targets = self.lora_targets or LORA_TARGETS.get(model_type)
        lora = LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(targets) if targets else None,
            fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D layers
        )
        try:
            with seeded_rng(self.seed):  # A is random: the same on every process of a run
                return get_peft_model(model, lora)
        except ValueError as exc:
            raise TaskError(f"hf-causal-lm LoRA: {exc}") from exc

    def exchanged_parameters(self, model: nn.Module) -> list[str] | None:
        """With LoRA, the adapters (PEFT freezes everything else); otherwise everything."""
        if not self.lora:
            return None
        return [name for name, param in model.named_parameters() if param.requires_grad]

    def _encode(self, text: str) -> torch.Tensor:
        """Text as a 1-D tensor of token ids."""
        if not self.model_dir:
            return encode_bytes(text.encode("utf-8"))
        return torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.long)

    def _load_site_data(self) -> None:
        """The site's `data` rows (training, held-out) or `text` tokens, once."""
        if self._data_loaded:
            return
        if self.data is not None:
            self._rows, self._eval_rows = load_rows(
                self.data, self.tokenizer, self.data_options, derive_seed(self.seed, 0x5E1F)
            )
        elif self.text is not None:
            try:
                text = self.text.read_bytes().decode("utf-8", errors="replace")
            except OSError as exc:
                raise TaskError(f"hf-causal-lm text {self.text}: {exc.strerror or exc}") from exc
            tokens = self._encode(text)
            cut = int(len(tokens) * (1 - TEXT_HELDOUT_FRACTION))
            self._tokens, self._heldout = tokens[:cut], tokens[cut:]
        self._data_loaded = True

    def load_data(self, partition: int, num_partitions: int) -> None:
        """The site's own `data` or `text` file (the partition is not used), or the pydoc
        training topics j with j % num_partitions == partition."""
        self.partition = partition
        if self.data is not None or self.text is not None:
            self._load_site_data()
            if self._rows is not None:
                return
        else:
            check_partition(partition, num_partitions)
            train, _ = split_topics()
            if num_partitions > len(train):
                raise TaskError(
                    f"hf-causal-lm has {len(train)} training topics, "
                    f"fewer than {num_partitions} partitions"
                )
            self._tokens = self._encode("\n\n".join(train[partition::num_partitions]))
        assert self._tokens is not None
        if len(self._tokens) <= self.max_seq_len:
            raise TaskError(f"partition {partition} is shorter than max_seq_len {self.max_seq_len}")

    def _batches(self, config: Mapping[str, ConfigScalar], count: int) -> Iterator[Batch]:
        """`count` batches, drawn repeatably per (seed, partition, round): random windows
        of the token stream, or random rows of the site's records."""
        if self._rows is None:
            windows = window_batches(
                self._tokens,
                self.max_seq_len,
                {**config, "local_steps": count},
                self.seed,
                self.partition,
                self.device,
            )
            return ((x, y, None) for x, y in windows)
        rows = self._rows
        size = int(float(config.get("batch_size", 16)))
        seed = derive_seed(self.seed, self.partition, int(float(config.get("round", 0))))
        generator = torch.Generator().manual_seed(seed)
        return (
            rows.batch(torch.randint(len(rows), (size,), generator=generator), self.device)
            for _ in range(count)
        )

    def train(self, model: nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        if self._rows is None and self._tokens is None:
            raise TaskError("load_data must be called before training")
        return self.trainer.train(
            model,
            config,
            lambda count: self._batches(config, count),
            5e-3 if self.lora else 3e-3,
            self.report_progress,
            self.device,
        )

    def forget_optimizer_state(self) -> None:
        self.trainer.saved = {}

    def _score(self, model: nn.Module, batches: Iterator[Batch]) -> EvalResult:
        """Token-weighted loss and perplexity over `batches`."""
        total, count = 0.0, 0
        with evaluating(model):
            for batch in batches:
                with autocast(self.trainer.options.precision, self.device):
                    loss, n = token_loss(model, batch)
                total, count = total + float(loss), count + n
        mean = total / max(count, 1)
        return EvalResult(
            num_examples=count, metrics={"loss": mean, "perplexity": math.exp(min(mean, 50.0))}
        )

    def _score_rows(self, model: nn.Module, rows: Rows) -> EvalResult:
        index = torch.arange(len(rows))
        return self._score(
            model, (rows.batch(part, self.device) for part in index.split(EVAL_BATCH))
        )

    def _score_stream(self, model: nn.Module, tokens: torch.Tensor) -> EvalResult:
        if len(tokens) <= self.max_seq_len:
            raise TaskError(f"held-out text is shorter than max_seq_len {self.max_seq_len}")
        x, y = (t.to(self.device) for t in eval_windows(tokens, self.max_seq_len))
        return self._score(
            model,
            ((a, b, None) for a, b in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH), strict=True)),
        )

    def evaluate(self, model: nn.Module) -> EvalResult:
        """Loss and perplexity on this process's held-out data: the held-out part of its
        `data` or `text`, or else the held-out pydoc topics."""
        result = self.evaluate_local(model)
        if result is not None:
            return result
        if self._heldout is None:
            self._heldout = self._encode("\n\n".join(split_topics()[1]))
        return self._score_stream(model, self._heldout)

    def evaluate_local(self, model: nn.Module) -> EvalResult | None:
        """Loss and perplexity on the held-out part of the site's own `data` or `text`."""
        if self.data is None and self.text is None:
            return None
        self._load_site_data()
        if self._eval_rows is not None:
            return self._score_rows(model, self._eval_rows)
        if self._heldout is not None:
            return self._score_stream(model, self._heldout)
        return None

    def merge_adapters(self, model: nn.Module) -> nn.Module:
        """A copy of the model with its LoRA adapters merged into the base weights (a plain
        transformers model); the model itself when it has none."""
        if isinstance(model, PeftModel):
            return copy.deepcopy(model).merge_and_unload()
        return model

    def save_pretrained(
        self,
        model: nn.Module,
        directory: Path,
        *,
        merge_adapters: bool,
        base_model: str | None = None,
    ) -> None:
        """The model and its tokenizer for `AutoModelForCausalLM.from_pretrained(directory)`
        and `AutoTokenizer.from_pretrained(directory)`; with unmerged adapters, the adapter
        directory for `PeftModel.from_pretrained(base, directory)` (or
        `AutoPeftModelForCausalLM`), whose config names its base as `base_model` says (a
        hub name, or a path as the loader will see it), by default `model_dir` as the
        options give it, or directory/base where the base built from the config is saved."""
        if not isinstance(model, PeftModel) or merge_adapters:
            self.merge_adapters(model).save_pretrained(directory)  # type: ignore[operator]
            self.tokenizer.save_pretrained(directory)
            return
        if not self.model_dir:
            self._base_model().save_pretrained(directory / BASE_DIR)
            self.tokenizer.save_pretrained(directory / BASE_DIR)
        name = base_model or self.model_dir or str(directory / BASE_DIR)
        for adapter in model.peft_config.values():
            adapter.base_model_name_or_path = name
        model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(directory)


def _names(option: str | None) -> list[str] | None:
    """A comma-separated option as a list (None when absent)."""
    return [name for name in option.split(",") if name] if option else None
