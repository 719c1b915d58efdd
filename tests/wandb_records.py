"""Read a W&B run file (`run-<id>.wandb`) without a network or a W&B server: for the tests that
check what hpcforge sent to W&B (`hpcforge report` reads the trainer's metrics.jsonl instead).

W&B (0.31) has no public reader of its offline files: its own reader lives inside the wandb-core
binary. The file is W&B's LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0),
then 32 KiB blocks of chunks, each `crc32 (4, LE) | length (2, LE) | type (1) | data`, the CRC-32
(zlib's) of the type byte and the data; type FULL=1 holds a whole record, FIRST=2 / MIDDLE=3 /
LAST=4 a record split over blocks. Each record is a protobuf `wandb.proto.wandb_internal_pb2.Record`.
"""
from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    if not data.startswith(HEADER):
        raise ValueError(f"not a W&B run file (header {data[:7]!r}, expected {HEADER!r})")
    pos, parts = len(HEADER), []
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # the rest of a block too small for a chunk header is padding
            pos += room
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + 7:pos + 7 + length]
        if kind and zlib.crc32(bytes([kind]) + chunk) != crc:
            raise ValueError(f"corrupt W&B run file at byte {pos}: CRC mismatch")
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = [chunk]
        elif kind == MIDDLE:
            parts.append(chunk)
        elif kind == LAST:
            yield b"".join(parts + [chunk])
        elif kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
        else:
            raise ValueError(f"corrupt W&B run file at byte {pos}: chunk type {kind}")


def records(path: str | Path) -> Iterator[Any]:
    """Every protobuf Record in the file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb
    for payload in _payloads(Path(path).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def history(path: str | Path) -> list[dict[str, Any]]:
    """The logged rows (`run.log` calls), keys to decoded JSON values."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows


def run_config(path: str | Path) -> dict[str, Any]:
    """The run's config as W&B stored it (the last value of every key)."""
    out: dict[str, Any] = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            for item in rec.run.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif rec.WhichOneof("record_type") == "config":
            for item in rec.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
