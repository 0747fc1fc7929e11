"""The config of a model `hf-causal-lm` builds from its options (no model directory):
GPT-2 or Llama, small by default, initialised with std `init_range`."""

from __future__ import annotations

from typing import Any

from transformers import GPT2Config, LlamaConfig, PretrainedConfig


def model_config(task: Any, vocab_size: int) -> PretrainedConfig:
    """The config of `task`'s options (arch, sizes, block_size, init_range); ValueError
    for an unknown arch."""
    n_embd, n_layer, n_head = (
        task.int_option(key, default)
        for key, default in (("n_embd", 128), ("n_layer", 2), ("n_head", 4))
    )
    if task.arch == "gpt2":
        dropout = task.float_option("dropout", 0.0)
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=task.block_size,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_inner=task.int_option("n_inner", 4 * n_embd),
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            bos_token_id=None,
            eos_token_id=None,
            tie_word_embeddings=bool(task.int_option("tie", 1)),
            initializer_range=task.init_range,
        )
    if task.arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            max_position_embeddings=task.block_size,
            hidden_size=n_embd,
            intermediate_size=task.int_option("n_inner", 2 * n_embd),
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=task.int_option("n_kv_head", n_head),
            bos_token_id=None,
            eos_token_id=None,
            tie_word_embeddings=bool(task.int_option("tie", 0)),
            initializer_range=task.init_range,
        )
    raise ValueError(f"arch must be gpt2 or llama, got {task.arch!r}")
