"""The options and round settings `hf-causal-lm` declares (`tasks/options.py`): a key not
listed here is refused naming these, and `--help-task` and the docs list them."""

from __future__ import annotations

from fedstream.tasks.options import TaskOption

MODEL_OPTIONS = (
    TaskOption("arch", str, "gpt2", "gpt2 or llama, for a model built from a config"),
    TaskOption("model_dir", str, None, "a local pretrained model and its tokenizer"),
    TaskOption("n_layer", int, 2, "layers of a config-built model"),
    TaskOption("n_head", int, 4, "attention heads"),
    TaskOption("n_embd", int, 128, "width"),
    TaskOption("n_inner", int, None, "MLP width (gpt2: 4 * n_embd, llama: 2 * n_embd)"),
    TaskOption("n_kv_head", int, None, "llama's key/value heads (default: n_head)"),
    TaskOption("block_size", int, 64, "the positions of a config-built model"),
    TaskOption("dropout", float, 0.0, "gpt2's dropout"),
    TaskOption("tie", bool, None, "output layer shares the token embedding (gpt2 1, llama 0)"),
    TaskOption("init_range", float, 0.1, "std of a config-built model's initial weights"),
    TaskOption("lora", bool, False, "train LoRA adapters of a frozen base: only they travel"),
    TaskOption("lora_rank", int, 4, "LoRA rank"),
    TaskOption("lora_alpha", int, None, "LoRA scale (default: 2 * lora_rank)"),
    TaskOption("lora_dropout", float, 0.0, "LoRA dropout"),
    TaskOption("lora_targets", str, None, "adapted modules, comma-separated (default: all)"),
)
"""What shapes the model: the same on the coordinator and every site."""

SITE_OPTIONS = (
    TaskOption(
        "data",
        str,
        None,
        "this site's records: .jsonl .json .parquet .csv .txt or a save_to_disk directory",
    ),
    TaskOption("data_format", str, None, "text, prompt_response or chat (default: by columns)"),
    TaskOption("text_field", str, "text", "the field of plain text records"),
    TaskOption("prompt_field", str, "prompt", "the prompt of prompt/response records"),
    TaskOption("response_field", str, "response", "the response (the loss is on it alone)"),
    TaskOption("messages_field", str, "messages", "chat messages, rendered by the template"),
    TaskOption("pack", bool, None, "pack sequences (default: text packed, the others padded)"),
    TaskOption("eval_fraction", float, 0.1, "the share of records each site holds out"),
    TaskOption("text", str, None, "a plain text file instead of data"),
    TaskOption("max_seq_len", int, None, "tokens a sequence (default: block_size)"),
    TaskOption("precision", str, "fp32", "bf16, fp16 or fp32 (autocast on CUDA)"),
    TaskOption("grad_accum", int, 1, "batches accumulated into one optimiser step"),
    TaskOption("grad_checkpointing", bool, False, "recompute activations in the backward"),
    TaskOption("keep_optimizer", bool, False, "keep AdamW's state across rounds"),
)
"""Each site's own (`site_options`): they may differ from site to site."""

ROUND_SETTINGS = (
    TaskOption("local_steps", int, 30, "optimiser steps a round"),
    TaskOption("batch_size", int, 16, "rows a step and accumulation"),
    TaskOption("lr", float, None, "AdamW learning rate (3e-3, or 5e-3 with LoRA)"),
    TaskOption("warmup_steps", int, 0, "linear warm-up steps, counted across rounds"),
    TaskOption("total_rounds", int, 0, "rounds of the cosine decay (0: no decay)"),
    TaskOption("min_lr_ratio", float, 0.1, "where the decay ends, as a share of lr"),
    TaskOption("proximal_mu", float, 0.0, "FedProx coefficient (also --proximal-mu)"),
)
