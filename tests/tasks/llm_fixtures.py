"""A small pretrained language model and site data, made offline for the LLM tests: a BPE
tokenizer trained with `tokenizers` on CPython's pydoc topics, with a chat template, and a
Llama of about two million parameters, saved with `save_pretrained` into one directory."""

from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 1024
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def topic_texts() -> list[tuple[str, str]]:
    """(name, text) of every pydoc topic, in name order."""
    return [(name, topics[name]) for name in sorted(topics)]


def make_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([text for _, text in topic_texts()], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def make_model_dir(directory: Path, vocab: int = VOCAB) -> Path:
    """A tokenizer and a small Llama (embeddings for `vocab` tokens) saved in `directory`."""
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def prompt_records(site: int, sites: int) -> list[dict[str, str]]:
    """Prompt/response records of topics name-order i with i % sites == site."""
    return [
        {"prompt": f"Explain {name}:\n", "response": text[:200]}
        for i, (name, text) in enumerate(topic_texts())
        if i % sites == site
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path
