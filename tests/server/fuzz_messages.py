"""Hypothesis strategies for hostile calls to the Coordinator service, as raw wire bytes.

Every call is drawn as the exact bytes each request message puts on the wire (a list for
the Upload stream), so a failing example prints what was sent. The messages are arbitrary
bytes, or structurally valid protobuf with hostile field values, or Upload streams whose
messages come in the wrong order; see `calls()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from fedstream.common.proto.v1 import coordinator_pb2 as pb
from fedstream.common.wire.framing import frame_data
from fedstream.common.wire.manifest import Manifest
from fedstream.common.wire.stream import iter_chunks

from .conftest import TINY_DIGEST, TinyModel

U64_MAX = (1 << 64) - 1

MAX_CHUNK_BYTES = 4096
"""The coordinator's max_chunk_bytes in the fuzz test: a chunk one byte over it is cheap."""


@dataclass(frozen=True)
class Call:
    """One RPC as the fuzzing peer sends it: `messages` is the request (one message for a
    unary request, the stream for Upload); `credential` says which token it presents."""

    method: str
    messages: tuple[bytes, ...]
    credential: str = "session"
    """"session" (the fuzzer's own valid session), "none", or a forged token."""
    note: str = ""
    """How the call was made up, for the report of a failing example."""

    def __repr__(self) -> str:
        """Each message's length and first bytes: a failing example stays readable."""
        shown = ", ".join(
            f"<{len(m)} bytes: {m[:48]!r}{'...' if len(m) > 48 else ''}>" for m in self.messages
        )
        return f"Call({self.method}, [{shown}], credential={self.credential!r}, {self.note!r})"


def good_update() -> dict[str, torch.Tensor]:
    """The update an honest TinyTask client sends, in the tiny model's layout."""
    init = {k: v for k, v in TinyModel(0).state_dict().items() if v.is_floating_point()}
    return {k: (v + 0.375) - v for k, v in init.items()}


GOOD = good_update()
GOOD_MANIFEST = Manifest.from_tensors(GOOD).to_proto()
GOOD_BYTES = b"".join(bytes(c) for c in iter_chunks(list(GOOD.values()), 1 << 20))


def valid_upload(round_number: int, model_version: int) -> tuple[bytes, ...]:
    """A header and data chunks the coordinator books for `round_number`."""
    head = pb.UpdateHeader(round=round_number, model_version=model_version, num_examples=30)
    head.manifest.CopyFrom(GOOD_MANIFEST)
    return (pb.UpdateChunk(header=head).SerializeToString(), frame_data(GOOD_BYTES))


# ---- field values ----------------------------------------------------------------------

EDGES = [0, 1, 2, 3, (1 << 31) - 1, (1 << 32) - 1, 1 << 32, 1 << 40, (1 << 40) + 1]
u64 = st.one_of(
    st.integers(0, 3),
    st.sampled_from([*EDGES, (1 << 63) - 1, 1 << 63, U64_MAX]),
    st.integers(0, U64_MAX),
)
u32 = st.one_of(st.integers(0, 9), st.sampled_from(EDGES[:6]), st.integers(0, (1 << 32) - 1))
i64 = st.one_of(
    st.integers(-2, 8),
    st.sampled_from([-(1 << 63), -1, 1 << 31, 1 << 40, (1 << 63) - 1]),
)
examples = st.one_of(st.integers(0, 100), st.integers(1, 100), u64)
floats = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5]),
    st.floats(allow_nan=True, allow_infinity=True),
)
utf8 = st.characters(codec="utf-8")
very_long = st.tuples(st.sampled_from(["t", "é", "\n"]), st.integers(1 << 12, 1 << 14)).map(
    lambda piece: piece[0] * piece[1]
)
"""4 to 16 Ki characters: past what a gRPC status message can carry (about 8 KiB of
trailers) if a refusal echoes it whole."""
names = st.one_of(
    st.sampled_from(["", "loss", "w", "h", "steps", "x" * 65, "é" * 40]),
    st.text(utf8, max_size=12),
    st.text(utf8, min_size=60, max_size=300),
    very_long,
)
"""Empty, short, long and very long names."""
metrics = st.one_of(
    st.dictionaries(names, floats, max_size=4),
    st.integers(60, 200).map(lambda n: {f"m{i}": 0.0 for i in range(n)}),
)
DTYPE_NAMES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"]
dtypes = st.one_of(st.sampled_from(DTYPE_NAMES), st.sampled_from(["", "f32", "F128", "float"]))
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}


@st.composite
def tensor_specs(draw: st.DrawFn) -> pb.TensorSpec:
    dtype = draw(dtypes)
    shape = draw(st.lists(i64, max_size=draw(st.sampled_from([3, 12]))))
    consistent = math.prod(shape) * ITEMSIZE.get(dtype, 1)
    usable = 0 <= consistent <= U64_MAX and draw(st.booleans())
    nbytes = consistent if usable else draw(u64)
    return pb.TensorSpec(name=draw(names), dtype=dtype, shape=shape, nbytes=nbytes)


@st.composite
def manifests(draw: st.DrawFn) -> pb.Manifest:
    """The right manifest, one with a field of one tensor changed, or another altogether
    (wrong shapes and dtypes, too many tensors, absurd sizes, a wrong codec)."""
    manifest = pb.Manifest()
    manifest.CopyFrom(GOOD_MANIFEST)
    kind = draw(st.sampled_from(["good", "mutated", "mutated", "arbitrary", "many"]))
    if kind == "mutated":
        spec = manifest.tensors[draw(st.integers(0, len(manifest.tensors) - 1))]
        match draw(st.sampled_from(["name", "dtype", "shape", "nbytes", "swap", "dup", "drop"])):
            case "name":
                spec.name = draw(names)
            case "dtype":
                spec.dtype = draw(dtypes)
            case "shape":
                spec.shape[:] = draw(st.lists(i64, max_size=4))
            case "nbytes":
                spec.nbytes = draw(u64)
            case "swap":
                manifest.tensors[0].name, manifest.tensors[1].name = "h", "w"
            case "dup":
                manifest.tensors.add().CopyFrom(spec)
            case "drop":
                del manifest.tensors[-1]
    elif kind == "arbitrary":
        del manifest.tensors[:]
        manifest.tensors.extend(draw(st.lists(tensor_specs(), max_size=4)))
    elif kind == "many":
        extra = draw(st.integers(1, 300))
        manifest.tensors.extend(
            pb.TensorSpec(name=f"t{i}", dtype="F32", shape=[1], nbytes=4) for i in range(extra)
        )
    if draw(st.integers(0, 5)) == 0:
        manifest.codec = draw(
            st.sampled_from(
                ["", "fp16", "int8", "int4", "topk:0.5", "topk2+zstd", "raw+zstd", "RAW"]
            )
        )
    return manifest


@dataclass(frozen=True)
class Current:
    """The round open while a stage of the fuzz runs, and the model version it trains (for
    the evaluation of round r: r and version r): most hostile messages get every field
    right but one, so the checks behind the first ones are reached."""

    round: int
    model_version: int


def near(value: int) -> st.SearchStrategy[int]:
    """`value`, often; a neighbour of it; or any uint64."""
    # hypothesis starts from the first branches: the first examples are hostile
    return st.one_of(st.integers(0, 3), u64, st.just(value), st.just(value))


HOSTILE_FIELDS = ["round", "version", "examples", "metrics", "manifest", "manifest", "all"]


@st.composite
def update_headers(draw: st.DrawFn, current: Current) -> bytes:
    """An UpdateChunk header with a hostile value in one of its fields (round, version,
    examples, metrics, manifest), or in all of them; now and then all of them valid."""
    hostile = draw(st.sampled_from(HOSTILE_FIELDS))
    head = pb.UpdateHeader(
        round=draw(near(current.round)) if hostile in ("round", "all") else current.round,
        model_version=(
            draw(near(current.model_version))
            if hostile in ("version", "all")
            else current.model_version
        ),
        num_examples=draw(examples) if hostile in ("examples", "all") else 30,
    )
    head.metrics.update(draw(metrics) if hostile in ("metrics", "all") else {"loss": 0.5})
    head.manifest.CopyFrom(draw(manifests()) if hostile in ("manifest", "all") else GOOD_MANIFEST)
    return pb.UpdateChunk(header=head).SerializeToString()


def good_headers(current: Current) -> st.SearchStrategy[bytes]:
    """A valid header: for the current round, or for another round or version."""
    return st.tuples(near(current.round), near(current.model_version)).map(
        lambda rv: valid_upload(*rv)[0]
    )


@st.composite
def data_streams(draw: st.DrawFn) -> list[bytes]:
    """Data chunks for the right manifest: the right bytes, poisoned with NaN or inf,
    truncated, overflowing, or cut into chunks of a hostile size."""
    payload = bytearray(GOOD_BYTES)
    match draw(st.sampled_from(["truncated", "nan", "inf", "overflow", "empty", "good"])):
        case "nan" | "inf" as poison:
            index = draw(st.integers(0, 11))  # a float32 of `w`
            value = torch.tensor([math.nan if poison == "nan" else -math.inf])
            payload[4 * index : 4 * index + 4] = value.numpy().tobytes()
        case "truncated":
            del payload[draw(st.integers(0, len(payload) - 1)) :]
        case "overflow":
            payload += draw(st.binary(min_size=1, max_size=64))
        case "empty":
            payload.clear()
    size = draw(st.one_of(st.integers(1, 64), st.just(len(GOOD_BYTES))))
    chunks = [frame_data(bytes(payload[i : i + size])) for i in range(0, len(payload), size)]
    if draw(st.integers(0, 7)) == 0:
        chunks.append(frame_data(b""))
    return chunks


junk = st.binary(max_size=96)


def chunk_parts(current: Current) -> st.SearchStrategy[list[bytes]]:
    """A piece of an upload stream: one or more messages of any kind."""
    return st.one_of(
        update_headers(current).map(lambda h: [h]),
        good_headers(current).map(lambda h: [h]),
        data_streams(),
        junk.map(lambda b: [frame_data(b)]),
        junk.map(lambda b: [b]),
        st.just([b""]),  # neither header nor data
        st.just([frame_data(b"\0" * (MAX_CHUNK_BYTES + 1))]),  # a chunk over the bound
        st.just([pb.UpdateChunk(data=b"\1\2\3").SerializeToString() + b"\x12\x00"]),
    )


@st.composite
def upload_streams(draw: st.DrawFn, current: Current) -> tuple[tuple[bytes, ...], str]:
    """An Upload stream and what kind it is: arbitrary messages, a header and data
    (either may be hostile), data before the header, two headers, a header then junk, a
    header alone."""
    chunk_part = chunk_parts(current)
    kind = draw(
        st.sampled_from(
            [
                "bytes",
                "mixed",
                "header+data",
                "header+data",
                "data-first",
                "two-headers",
                "header+junk",
                "header-only",
            ]
        )
    )
    head = draw(st.one_of(good_headers(current), update_headers(current)))
    if kind == "bytes":
        parts = draw(st.lists(st.binary(max_size=128), min_size=1, max_size=4))
    elif kind == "mixed":
        parts = [m for part in draw(st.lists(chunk_part, min_size=1, max_size=5)) for m in part]
    elif kind == "header+data":
        parts = [head, *draw(data_streams())]
    elif kind == "data-first":
        parts = [*draw(data_streams()), head]
    elif kind == "two-headers":
        data = draw(data_streams())
        cut = draw(st.integers(0, len(data)))
        parts = [head, *data[:cut], draw(update_headers(current)), *data[cut:]]
    elif kind == "header+junk":
        parts = [
            head,
            *[m for part in draw(st.lists(chunk_part, min_size=1, max_size=3)) for m in part],
        ]
    else:
        parts = [head]
    return tuple(parts), kind


# ---- the other RPCs ---------------------------------------------------------------------


@st.composite
def join_requests(draw: st.DrawFn) -> bytes:
    name = draw(st.one_of(st.sampled_from(["mallory", "client-0", "client-1", "x" * 129]), names))
    task = draw(st.one_of(st.just("tiny"), st.just("tiny"), st.just("digits"), very_long, names))
    digest = draw(st.one_of(st.just(TINY_DIGEST), st.just(TINY_DIGEST), st.just("0" * 64), names))
    num = draw(st.one_of(st.integers(1, 8), st.integers(1, 8), u32))
    partition = draw(st.one_of(st.integers(0, max(0, num - 1)), u32))
    return pb.JoinRequest(
        name=name, task=task, partition=partition, num_partitions=num, model_digest=digest
    ).SerializeToString()


download_requests = st.builds(
    lambda version, offset, chunk: pb.DownloadRequest(
        model_version=version, offset=offset, chunk_bytes=chunk
    ).SerializeToString(),
    st.one_of(st.integers(0, 1), st.integers(0, 1), u64),
    st.one_of(st.integers(0, 64), st.integers(0, 64), u64),
    st.one_of(st.integers(0, 4), u32),
)


def evaluation_reports(current: Current) -> st.SearchStrategy[bytes]:
    """Reports for the current round's evaluation or another, of hostile counts and metrics
    (in a training stage no evaluation is open: every report is for a round not open)."""
    return st.builds(
        lambda round_, version, examples, named: pb.EvaluationReport(
            round=round_, model_version=version, num_examples=examples, metrics=named
        ).SerializeToString(),
        near(current.round),
        near(current.round),
        st.one_of(st.integers(0, 10), u64),
        st.one_of(metrics, st.just({"loss": 0.5}), st.just({})),
    )


def heartbeats(current: Current) -> st.SearchStrategy[bytes]:
    return near(current.round).map(lambda r: pb.HeartbeatRequest(round=r).SerializeToString())


polls = st.one_of(st.just(b""), st.just(b"\x08\x05"), st.just(b"\x0a\x03abc"))

credentials = st.sampled_from(["session"] * 8 + ["none", "forged"]).flatmap(
    lambda c: (
        st.text("abcdefXYZ0123456789-_", min_size=1, max_size=40) if c == "forged" else st.just(c)
    )
)
"""Mostly the fuzzer's own session: the hostile calls should get past authentication."""


def _unary(method: str, requests: st.SearchStrategy[bytes], note: str) -> st.SearchStrategy[Call]:
    return st.builds(
        lambda request, credential: Call(method, (request,), credential, note),
        requests,
        credentials,
    )


def _uploads(current: Current) -> st.SearchStrategy[Call]:
    return st.builds(
        lambda stream, credential: Call("Upload", stream[0], credential, stream[1]),
        upload_streams(current),
        credentials,
    )


METHOD_NAMES = ["Join", "Poll", "Download", "Upload", "ReportEvaluation", "Heartbeat"]


def _raw_bytes(method: str) -> st.SearchStrategy[Call]:
    count = st.integers(1, 4) if method == "Upload" else st.just(1)
    return st.builds(
        lambda n, blobs, credential: Call(method, tuple(blobs[:n]), credential, "bytes"),
        count,
        st.lists(junk, min_size=4, max_size=4),
        credentials,
    )


def calls(current: Current) -> st.SearchStrategy[Call]:
    """A hostile call to any RPC while round `current` (or its evaluation) is open."""
    return st.one_of(
        st.sampled_from(METHOD_NAMES).flatmap(_raw_bytes),
        _unary("Join", join_requests(), "hostile fields"),
        _unary("Poll", polls, "poll"),
        _unary("Download", download_requests, "hostile fields"),
        _uploads(current),
        _uploads(current),
        _uploads(current),
        _unary("ReportEvaluation", evaluation_reports(current), "hostile fields"),
        _unary("Heartbeat", heartbeats(current), "hostile fields"),
    )


def explicit_calls(current: Current) -> list[Call]:
    """Calls every stage sends before the drawn ones: the shapes hypothesis found to go
    wrong, so they are tried on every run, not only when the draw happens on them."""
    long_task = pb.JoinRequest(
        name="loss", task="t" * 20000, partition=0, num_partitions=8, model_digest=TINY_DIGEST
    )
    long_metric = pb.UpdateHeader(
        round=current.round, model_version=current.model_version, num_examples=30
    )
    long_metric.metrics["m" * (1 << 14)] = 0.5
    long_metric.manifest.CopyFrom(GOOD_MANIFEST)
    long_tensor = pb.UpdateHeader(
        round=current.round, model_version=current.model_version, num_examples=30
    )
    long_tensor.manifest.CopyFrom(GOOD_MANIFEST)
    long_tensor.manifest.tensors[0].name = "w" * (1 << 14)
    long_tensor.manifest.codec = "c" * (1 << 14)
    report = pb.EvaluationReport(round=current.round, model_version=current.round, num_examples=5)
    report.metrics["\n" * (1 << 14)] = 0.5
    return [
        Call("Join", (long_task.SerializeToString(),), "none", "task of 20000 characters"),
        Call(
            "Upload",
            (pb.UpdateChunk(header=long_metric).SerializeToString(),),
            "session",
            "metric named by 16 Ki characters",
        ),
        Call(
            "Upload",
            (pb.UpdateChunk(header=long_tensor).SerializeToString(),),
            "session",
            "tensor and codec named by 16 Ki characters",
        ),
        Call(
            "ReportEvaluation",
            (report.SerializeToString(),),
            "session",
            "metric named by 16 Ki newlines",
        ),
    ]
