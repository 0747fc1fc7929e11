"""The tokenizer of `hf-causal-lm`: a model directory's own, or byte tokens for a model
built from a config.

A model directory (`model_dir`) is read with `AutoTokenizer.from_pretrained(...,
local_files_only=True)`: nothing is downloaded. A model built from a config has no
tokenizer of its own, so its tokens are UTF-8 bytes (`fedstream.tasks.bytetext`); for it
`byte_tokenizer` makes a real `tokenizers` tokenizer whose ids are exactly the byte values,
so an export of such a model still loads with `AutoTokenizer.from_pretrained` and
`generate` with it gives the same text the task trained on.
"""

from __future__ import annotations

import functools
import os

# Offline before huggingface_hub is first imported (it reads these once); an explicit
# setting in the environment wins. `local_files_only=True` below holds either way.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402
from transformers import PreTrainedTokenizerFast as FastTokenizer  # noqa: E402

from fedstream.tasks.task import TaskError  # noqa: E402

BYTE_VOCAB = 256


@functools.cache
def _byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (what `ByteLevel` pre-tokenizers use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = dict(zip(printable, map(chr, printable), strict=True))
    extra = 0
    for byte in range(BYTE_VOCAB):
        if byte not in chars:
            chars[byte] = chr(BYTE_VOCAB + extra)
            extra += 1
    return chars


def byte_tokenizer() -> FastTokenizer:
    """A tokenizer whose ids are the text's UTF-8 bytes (vocabulary 256, no special tokens)."""
    chars = _byte_chars()
    tokenizer = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(BYTE_VOCAB)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return FastTokenizer(tokenizer_object=tokenizer, model_max_length=1 << 30)


def load_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `model_dir`; TaskError, in one line, when there is none."""
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaskError(
            f"hf-causal-lm model_dir {model_dir}: no tokenizer to load: {first}"
        ) from None


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, embeddings: int, where: str) -> None:
    """TaskError unless every id the tokenizer makes has a row in the model's embeddings."""
    size = len(tokenizer)
    if size > embeddings:
        raise TaskError(
            f"hf-causal-lm {where}: the tokenizer has {size} tokens but the model's "
            f"embeddings hold {embeddings}"
        )


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id padding is written with (masked out of attention and loss, so any id does)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0
