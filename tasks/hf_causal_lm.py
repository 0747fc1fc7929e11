"""Built-in task `hf-causal-lm`: a Hugging Face transformers causal language model, fully
or through PEFT LoRA adapters (`pip install 'fedstream[hf]'`).

The model is built from a config (`arch=gpt2` or `arch=llama`, small by default, any
size by options) under the run's seed, so every process builds the same one, or loaded
from a local directory (`model_dir=PATH`, anything `AutoModelForCausalLM.from_pretrained`
reads; nothing is downloaded). Tokens are bytes (`fedstream.tasks.bytetext`), so the
model needs a vocabulary of at least 256 and no tokenizer. The text is CPython's pydoc
topics dealt to clients by partition, or the site's own file (`text=PATH`, a per-site
option): then the partition is not used, and the file's last tenth is its held-out part.

With `lora=1` the model is wrapped by PEFT (`LoraConfig`; Hu et al., "LoRA: Low-Rank
Adaptation of Large Language Models", ICLR 2022): the base is frozen, and only the
adapters' A and B matrices are exchanged, aggregated and checkpointed.

`save_pretrained` writes what `from_pretrained` reads back: the model (adapters merged
into it on request) for `AutoModelForCausalLM`, or the adapters for `PeftModel` beside the
frozen base they belong to.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedstream.tasks import ConfigScalar, EvalResult, Task, TaskError, TrainResult
from fedstream.tasks.bytetext import (
    encode,
    encode_bytes,
    eval_windows,
    heldout_tokens,
    split_topics,
    window_batches,
)
from fedstream.tasks.training import (
    ProximalTerm,
    check_partition,
    config_float,
    config_int,
    evaluating,
    seeded_rng,
)

try:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        LlamaConfig,
        PretrainedConfig,
        PreTrainedModel,
    )
except ImportError as exc:
    raise ImportError(
        f"hf-causal-lm needs transformers and peft: pip install 'fedstream[hf]' ({exc})"
    ) from exc

VOCAB_SIZE = 256
"""Byte tokens."""
TEXT_HELDOUT_FRACTION = 0.1
"""The tail of a site's own text file kept for evaluation."""
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
    """Options: `arch` (gpt2 | llama), `model_dir` (a local pretrained model instead of a
    config), `n_layer` (2), `n_head` (4), `n_embd` (128), `n_inner` (MLP width: gpt2
    4 * n_embd, llama 2 * n_embd), `n_kv_head` (llama: n_head), `block_size` (64),
    `dropout` (0, gpt2), `tie` (output layer shares the token embedding: gpt2 1, llama 0),
    `init_range` (0.1: the std of a config-built model's initial weights, see INIT_RANGE),
    `text` (this site's own text file), `lora` (0), `lora_rank` (4), `lora_alpha`
    (2 * rank), `lora_dropout` (0), `lora_targets` (the adapted modules, comma-separated:
    every attention and MLP projection).

    Round config: `local_steps` (30), `batch_size` (16), `lr` (3e-3, or 5e-3 with LoRA;
    AdamW, fresh each round; at 1e-2 LoRA's held-out loss stalls by the third short
    round), `proximal_mu` (0), `round` (varies the windows drawn).
    """

    def __init__(self, options: Mapping[str, str] | None = None, seed: int = 0) -> None:
        super().__init__(options, seed)
        try:
            self.arch = self.option("arch", "gpt2")
            self.model_dir = self.options.get("model_dir")
            self.block_size = self.int_option("block_size", 64)
            self.lora = bool(self.int_option("lora", 0))
            self.lora_rank = self.int_option("lora_rank", 4)
            self.lora_alpha = self.int_option("lora_alpha", 2 * self.lora_rank)
            self.lora_dropout = self.float_option("lora_dropout", 0.0)
            self.init_range = self.float_option("init_range", INIT_RANGE)
            self.config = None if self.model_dir else self._config()
        except ValueError as exc:
            raise TaskError(f"hf-causal-lm options: {exc}") from exc
        if self.block_size < 1 or self.lora_rank < 1 or not self.init_range > 0:
            raise TaskError("hf-causal-lm needs block_size >= 1, lora_rank >= 1 and init_range > 0")
        self.lora_targets = _names(self.options.get("lora_targets"))
        self.text = Path(self.options["text"]) if "text" in self.options else None
        self.partition = 0
        self._tokens: torch.Tensor | None = None
        self._heldout: torch.Tensor | None = None

    def _config(self) -> PretrainedConfig:
        n_embd, n_layer, n_head = (
            self.int_option(key, default)
            for key, default in (("n_embd", 128), ("n_layer", 2), ("n_head", 4))
        )
        if self.arch == "gpt2":
            dropout = self.float_option("dropout", 0.0)
            return GPT2Config(
                vocab_size=VOCAB_SIZE,
                n_positions=self.block_size,
                n_embd=n_embd,
                n_layer=n_layer,
                n_head=n_head,
                n_inner=self.int_option("n_inner", 4 * n_embd),
                resid_pdrop=dropout,
                embd_pdrop=dropout,
                attn_pdrop=dropout,
                bos_token_id=None,
                eos_token_id=None,
                tie_word_embeddings=bool(self.int_option("tie", 1)),
                initializer_range=self.init_range,
            )
        if self.arch == "llama":
            return LlamaConfig(
                vocab_size=VOCAB_SIZE,
                max_position_embeddings=self.block_size,
                hidden_size=n_embd,
                intermediate_size=self.int_option("n_inner", 2 * n_embd),
                num_hidden_layers=n_layer,
                num_attention_heads=n_head,
                num_key_value_heads=self.int_option("n_kv_head", n_head),
                bos_token_id=None,
                eos_token_id=None,
                tie_word_embeddings=bool(self.int_option("tie", 0)),
                initializer_range=self.init_range,
            )
        raise ValueError(f"arch must be gpt2 or llama, got {self.arch!r}")

    def _base_model(self) -> PreTrainedModel:
        """The model without adapters: from `model_dir`, or from the config under the seed."""
        if self.model_dir:
            try:
                model = AutoModelForCausalLM.from_pretrained(self.model_dir, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise TaskError(f"hf-causal-lm model_dir {self.model_dir}: {exc}") from exc
            vocab = model.config.get_text_config().vocab_size
            if vocab < VOCAB_SIZE:
                raise TaskError(
                    f"hf-causal-lm model_dir {self.model_dir}: a vocabulary of {vocab} "
                    f"cannot hold byte tokens ({VOCAB_SIZE})"
                )
            return model
        with seeded_rng(self.seed):
            return AutoModelForCausalLM.from_config(self.config)

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

    def load_data(self, partition: int, num_partitions: int) -> None:
        """The site's own `text` file (its first 90%; the partition is not used), or the
        pydoc training topics j with j % num_partitions == partition."""
        if self.text is not None:
            self._tokens, self._heldout = self._text_split()
        else:
            check_partition(partition, num_partitions)
            train, _ = split_topics()
            if num_partitions > len(train):
                raise TaskError(
                    f"hf-causal-lm has {len(train)} training topics, "
                    f"fewer than {num_partitions} partitions"
                )
            self._tokens = encode(train[partition::num_partitions])
        if len(self._tokens) <= self.block_size:
            raise TaskError(f"partition {partition} is shorter than block_size {self.block_size}")
        self.partition = partition

    def _text_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(training bytes, held-out bytes) of the site's text file."""
        assert self.text is not None
        try:
            tokens = encode_bytes(self.text.read_bytes())
        except OSError as exc:
            raise TaskError(f"hf-causal-lm text {self.text}: {exc.strerror or exc}") from exc
        cut = int(len(tokens) * (1 - TEXT_HELDOUT_FRACTION))
        return tokens[:cut], tokens[cut:]

    def _batches(
        self, config: Mapping[str, ConfigScalar]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`local_steps` batches of (inputs, targets) windows, drawn repeatably per round."""
        return window_batches(
            self._tokens, self.block_size, config, self.seed, self.partition, self.device
        )

    def train(self, model: nn.Module, config: Mapping[str, ConfigScalar]) -> TrainResult:
        trainable = [p for p in model.parameters() if p.requires_grad]
        lr = config_float(config, "lr", 5e-3 if self.lora else 3e-3)
        optimizer = torch.optim.AdamW(trainable, lr=lr)
        proximal = ProximalTerm(model, config_float(config, "proximal_mu", 0.0))
        total = config_int(config, "local_steps", 30)
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        steps = examples = 0
        for x, y in self._batches(config):
            loss = _loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            (loss + proximal()).backward()
            nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
            examples += y.numel()
            self.report_progress(steps, total)
        return TrainResult(num_examples=examples, metrics={"loss": loss_sum.item() / steps})

    def evaluate(self, model: nn.Module) -> EvalResult:
        """Loss on the held-out pydoc topics, or on the tail of the site's text file."""
        if self.text is not None:
            if self._heldout is None:
                self._heldout = self._text_split()[1]
            tokens = self._heldout
        else:
            tokens = heldout_tokens()
        if len(tokens) <= self.block_size:
            raise TaskError(f"held-out text is shorter than block_size {self.block_size}")
        x, y = (t.to(self.device) for t in eval_windows(tokens, self.block_size))
        with evaluating(model):
            loss = _loss(model, x, y).item()
        return EvalResult(num_examples=y.numel(), metrics={"loss": loss})

    def merge_adapters(self, model: nn.Module) -> nn.Module:
        """A copy of the model with its LoRA adapters merged into the base weights (a plain
        transformers model); the model itself when it has none."""
        if isinstance(model, PeftModel):
            return copy.deepcopy(model).merge_and_unload()
        return model

    def save_pretrained(self, model: nn.Module, directory: Path, *, merge_adapters: bool) -> None:
        """The model for `AutoModelForCausalLM.from_pretrained(directory)`; with unmerged
        adapters, the adapter directory for `PeftModel.from_pretrained(base, directory)`
        (or `AutoPeftModelForCausalLM.from_pretrained(directory)`), whose config names its
        base: `model_dir`, or the base built from the config, saved in directory/base."""
        if not isinstance(model, PeftModel) or merge_adapters:
            self.merge_adapters(model).save_pretrained(directory)  # type: ignore[operator]
            return
        if self.model_dir:
            base = Path(self.model_dir).resolve()
        else:
            base = (directory / BASE_DIR).resolve()
            self._base_model().save_pretrained(base)
        for adapter in model.peft_config.values():
            adapter.base_model_name_or_path = str(base)
        model.save_pretrained(str(directory))


def _names(option: str | None) -> list[str] | None:
    """A comma-separated option as a list (None when absent)."""
    return [name for name in option.split(",") if name] if option else None


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the (B, T) windows."""
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
