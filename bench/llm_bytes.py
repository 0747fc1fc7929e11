"""`python -m bench.llm_bytes`: what a round of LLM fine-tuning moves, and what a LoRA
round costs a client in memory.

Bytes: a Llama of about a billion parameters (Llama-3.2-1B's shape: 16 layers, width 2048,
MLP 8192, 32 heads of which 8 key/value, a vocabulary of 128,256, tied embeddings) is
built from its config on the `meta` device (no memory, no download), wrapped by
`hf-causal-lm`'s LoRA exactly as the task wraps it, and measured by the wire's own
manifest: the bytes one client downloads (and uploads) each round, full model against
LoRA adapters, per rank. A round of N clients moves 2 x N times that.

Memory: one LoRA round (`--steps` optimiser steps) of a smaller Llama that this machine
can run (`--width`, `--layers`, `--vocab`) through the task's own `train`, in a child
process, whose peak resident set (ru_maxrss) is printed beside its size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from fedstream.tasks import exchanged_names
from fedstream.tasks.hf_causal_lm import LORA_TARGETS

LLAMA_1B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": True,
}


class _Lora:
    """Enough of the task to name its exchanged tensors: the adapters' trainable ones."""

    def exchanged_parameters(self, model: torch.nn.Module) -> list[str]:
        return [name for name, param in model.named_parameters() if param.requires_grad]


def round_bytes(rank: int | None, dtype: torch.dtype) -> tuple[int, int]:
    """(parameters, bytes one client downloads per round) of the 1B Llama: the full model
    in `dtype`, or its LoRA adapters of `rank` (fp32, as PEFT makes them). Meta tensors
    have no storage to tell ties by, so a tied tensor is told by its Parameter (what
    `named_parameters` lists once); the wire sends it once too (`Manifest.of_model`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_1B), dtype=dtype)
        params = sum(p.numel() for p in model.parameters())
        if rank is not None:
            targets = list(LORA_TARGETS["llama"])
            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                     target_modules=targets))  # fmt: skip
    sent = dict(model.named_parameters())
    wanted = set(sent) if rank is None else set(exchanged_names(_Lora(), model))  # type: ignore[arg-type]
    return params, sum(t.numel() * t.element_size() for n, t in sent.items() if n in wanted)


def lora_round_memory(width: int, layers: int, vocab: int, steps: int, seq: int) -> dict:
    """A LoRA round of the task on a config-built Llama, here; peak RSS and time."""
    from fedstream.tasks import load_task
    from fedstream.tasks.hf_causal_lm import HFCausalLMTask

    options = {"arch": "llama", "n_embd": str(width), "n_layer": str(layers),
               "n_head": str(max(width // 64, 1)), "n_inner": str(4 * width),
               "block_size": str(seq), "lora": "1", "lora_rank": "8"}  # fmt: skip
    task = load_task("hf-causal-lm", options)
    assert isinstance(task, HFCausalLMTask)
    task.load_data(0, 1)
    model = task.build_model()
    # The task's byte vocabulary is 256: widen the embeddings to a real vocabulary's size.
    model.resize_token_embeddings(vocab)  # type: ignore[operator]
    params = sum(p.numel() for p in model.parameters())
    started = time.monotonic()
    result = task.train(model, {"local_steps": steps, "batch_size": 4, "round": 1})
    return {
        "params": params,
        "seconds": round(time.monotonic() - started, 2),
        "tokens_per_s": round(result.metrics["tokens_per_s"]),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        figures = lora_round_memory(args.width, args.layers, args.vocab, args.steps, args.seq)
        print(json.dumps(figures))
        return 0

    print("bytes one client downloads per round (and uploads), Llama ~1B from its config:")
    for label, rank, dtype in [
        ("full, fp32", None, torch.float32),
        ("full, bf16", None, torch.bfloat16),
        *[(f"LoRA r={r}", r, torch.bfloat16) for r in (8, 16, 64)],
    ]:
        params, nbytes = round_bytes(rank, dtype)
        print(f"  {label:<11} {nbytes:>15,} bytes ({nbytes / 2**20:9.1f} MiB); model {params:,}")
    sizes = ("width", "layers", "vocab", "steps", "seq")
    child = [sys.executable, "-m", "bench.llm_bytes", "--memory-child",
             *(f"--{k}={getattr(args, k)}" for k in sizes)]  # fmt: skip
    figures = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
    print(
        f"a LoRA round (r=8, {args.steps} steps of 4 x {args.seq} tokens, fp32, CPU) of a "
        f"{figures['params']:,}-parameter Llama: peak RSS "
        f"{figures['peak_rss_bytes'] / 2**20:,.0f} MiB, {figures['seconds']} s, "
        f"{figures['tokens_per_s']:,} tokens/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
