"""Which files an ONNX model's external data refers to, and which such names are acceptable. Stdlib only.

The torch-free side needs both without the ``onnx`` package: ``slim submit`` sends a model's data files
along with it, and the API checks the names of several files uploaded as one model before storing them.
Names are plain file names beside the model (no folders, no ``..``, no leading dot or dash): they become
file names in the job's folder, and an ONNX ``location`` is a path the loader would otherwise follow
anywhere (external data has had path-traversal CVEs). The reader below walks only the protobuf fields
that can hold tensors and skips everything else by its length, so a large file costs little.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterator
from pathlib import Path

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}$")

# protobuf field numbers (onnx.proto3): where tensors and their external_data entries live
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTR = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a model data file's name, or None when it can."""
    if not name:
        return "it is empty"
    if "/" in name or "\\" in name:
        return "it has a folder in it (absolute or relative paths are not allowed)"
    if name in (".", ".."):
        return "it names a folder"
    if not NAME.match(name):
        return "only letters, digits and . _ + - are allowed, not starting with . or -, at most 255 characters"
    return None


def external_locations(path: Path) -> list[str]:
    """Every distinct ``location`` the model's external tensors name, in first-seen order ([] when none).

    Raises ValueError when the file is not a readable protobuf (the server says what is wrong with it)."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            seen: dict[str, None] = {}
            for start, end in _sub(buf, 0, len(buf), _MODEL_GRAPH):
                for loc in _graph_locations(buf, start, end):
                    seen.setdefault(loc, None)
            return list(seen)


def _graph_locations(buf: mmap.mmap, start: int, end: int) -> Iterator[str]:
    for field, s, e in _fields(buf, start, end):
        if field == _GRAPH_INIT:
            yield from _tensor_locations(buf, s, e)
        elif field == _GRAPH_SPARSE:
            yield from _sparse_locations(buf, s, e)
        elif field == _GRAPH_NODE:
            for a_s, a_e in _sub(buf, s, e, _NODE_ATTR):
                for f2, s2, e2 in _fields(buf, a_s, a_e):
                    if f2 in (_ATTR_T, _ATTR_TENSORS):
                        yield from _tensor_locations(buf, s2, e2)
                    elif f2 in (_ATTR_G, _ATTR_GRAPHS):
                        yield from _graph_locations(buf, s2, e2)
                    elif f2 in (_ATTR_SPARSE, _ATTR_SPARSES):
                        yield from _sparse_locations(buf, s2, e2)


def _sparse_locations(buf: mmap.mmap, start: int, end: int) -> Iterator[str]:
    for field, s, e in _fields(buf, start, end):
        if field in (_SPARSE_VALUES, _SPARSE_INDICES):
            yield from _tensor_locations(buf, s, e)


def _tensor_locations(buf: mmap.mmap, start: int, end: int) -> Iterator[str]:
    for s, e in _sub(buf, start, end, _TENSOR_EXTERNAL):
        entry = {f: bytes(buf[s2:e2]) for f, s2, e2 in _fields(buf, s, e)}
        if entry.get(_ENTRY_KEY) == b"location":
            yield entry.get(_ENTRY_VALUE, b"").decode("utf-8", "replace")


def _sub(buf: mmap.mmap, start: int, end: int, wanted: int) -> Iterator[tuple[int, int]]:
    return ((s, e) for f, s, e in _fields(buf, start, end) if f == wanted)


def _fields(buf: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field in ``buf[start:end]``; others are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise ValueError("truncated protobuf field")
            yield field, pos, pos + size
            pos += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if pos > end:
        raise ValueError("truncated protobuf field")


def _varint(buf: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or malformed protobuf varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
