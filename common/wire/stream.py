"""A tensor's bytes on the wire: zero-copy views, and the chunked stream of many tensors.

Bytes are always taken through a `torch.uint8` view, never through a numpy array of the
tensor's own dtype: numpy has no bfloat16, and the raw bits are what must survive.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy, writable, flat uint8 view of a contiguous CPU tensor's bytes.

    The memoryview keeps the tensor's memory alive for as long as it exists.
    """
    if not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous tensor; call .contiguous() first")
    if t.device.type != "cpu":
        raise ValueError(f"tensor_bytes needs a CPU tensor, got one on {t.device}")
    # Flatten with explicit unit strides first: a 0-d tensor, or a contiguous one whose
    # size-0 or size-1 dimensions carry other strides, cannot be viewed as uint8 directly.
    flat = t.detach().as_strided((t.numel(),), (1,))
    return flat.view(torch.uint8).numpy().data


def iter_chunks(
    tensors: Iterable[torch.Tensor], chunk_size: int, offset: int = 0
) -> Iterator[memoryview | bytes]:
    """The concatenated bytes of `tensors` from byte `offset` on, in chunks of `chunk_size`.

    Every chunk but the last is exactly `chunk_size` bytes. A chunk inside one tensor
    is a zero-copy memoryview slice of it; one that spans tensors is joined into a new
    `bytes` (one copy of those bytes). Non-contiguous tensors are made contiguous one
    at a time as they are reached, so the whole stream never exists at once.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if offset < 0:
        raise ValueError(f"offset must not be negative, got {offset}")
    return _iter_chunks(tensors, chunk_size, offset)


def _iter_chunks(
    tensors: Iterable[torch.Tensor], chunk_size: int, offset: int
) -> Iterator[memoryview | bytes]:
    skip = offset
    # The start of the next chunk when it spans tensors: views, copied only once complete.
    parts: list[memoryview] = []
    pending = 0
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if skip >= size:
            skip -= size
            continue
        view = tensor_bytes(tensor.contiguous())
        pos, skip = skip, 0  # skip is only ever non-zero while parts is empty
        if parts:
            take = min(chunk_size - pending, size)
            parts.append(view[:take])
            pending += take
            pos = take
            if pending < chunk_size:
                continue
            yield b"".join(parts)
            parts, pending = [], 0
        while size - pos >= chunk_size:
            yield view[pos : pos + chunk_size]
            pos += chunk_size
        if pos < size:
            parts.append(view[pos:])
            pending = size - pos
    if skip:
        raise ValueError(f"offset {offset} is past the end of the stream")
    if len(parts) == 1:
        yield parts[0]
    elif parts:
        yield b"".join(parts)
