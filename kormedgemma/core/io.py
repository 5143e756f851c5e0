"""Reading and writing artifacts so that a failure never leaves half of one behind.

Every writer builds its output beside the destination under a temporary name and renames it
into place only when complete; an existing artifact is replaced only after the new one is whole.
A week-long run on a training box must be able to crash at any line without corrupting what an
earlier day produced.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional


class JsonlError(ValueError):
    """A JSONL file with a line that is not a JSON object; names the file and the line."""


class MissingArtifactError(FileNotFoundError):
    """An input that an earlier notebook should have produced is absent."""


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `final`, on failure it vanishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file beside `final`; rename it over `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    kwargs = {"encoding": encoding} if "b" not in mode else {}
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


def write_json(path: Path, data: Any) -> None:
    with atomic_file(path) as handle:
        json.dump(data, handle, ensure_ascii=False, indent=2, default=str)
        handle.write("\n")


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield each line's object; a bad line raises JsonlError naming file and line number."""
    for _, row in numbered_jsonl(path):
        yield row


def numbered_jsonl(path: Path, skipped: Optional[list[tuple[int, str]]] = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per line. A bad line raises JsonlError, or, when a `skipped` list is
    given, is recorded there as (line number, reason) and passed over."""
    path = Path(path)
    if not path.is_file():
        raise MissingArtifactError(f"{path} not found")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                reason = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
            except json.JSONDecodeError as exc:
                row, reason = None, f"not valid JSON ({exc.msg} at column {exc.colno})"
            if reason is None:
                yield number, row
            elif skipped is not None:
                skipped.append((number, reason))
            else:
                raise JsonlError(f"{path}:{number}: {reason}; fix or delete that line")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically; returns how many were written."""
    count = 0
    with atomic_file(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False))
            handle.write("\n")
            count += 1
    return count


def write_jsonl_shards(folder: Path, rows: Iterable[dict[str, Any]], shard_bytes: int) -> int:
    """Rows into `folder/00000.jsonl, 00001.jsonl, …`, a new shard once one reaches `shard_bytes`.

    Shards are what lets phase 0 spread a source over worker processes (datatrove hands whole
    files to tasks). Meant for a folder inside an atomic artifact: the folder is what is atomic."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count, shard, written, handle = 0, 0, 0, None
    try:
        for row in rows:
            if handle is None or written >= shard_bytes:
                if handle is not None:
                    handle.close()
                handle = open(folder / f"{shard:05d}.jsonl", "wb")
                shard, written = shard + 1, 0
            line = json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n"
            handle.write(line)
            written += len(line)
            count += 1
    finally:
        if handle is not None:
            handle.close()
    return count


def numbered_rows(path: Path, skipped: Optional[list[tuple[int, str]]] = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a .jsonl or .csv file (KorMedMCQA exports, local text sources).

    CSV is read as pandas writes it: a header row, quoted fields that may span lines (the number
    is the line a row starts on), and a first column with an empty header (the pandas index),
    which is dropped. Values stay as written (strings). A bad line or row raises, or, when a
    `skipped` list is given, is recorded there as (line number, reason) and passed over.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        yield from numbered_jsonl(path, skipped)
        return
    if path.suffix != ".csv":
        raise ValueError(f"{path}: expected a .jsonl or .csv file")
    if not path.is_file():
        raise MissingArtifactError(f"{path} not found")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        keep = [(i, name) for i, name in enumerate(header) if name.strip()]
        start = reader.line_num + 1
        for record in reader:
            if any(cell.strip() for cell in record):
                if len(record) != len(header):
                    reason = f"{len(record)} fields where the header has {len(header)}"
                    if skipped is None:
                        raise ValueError(f"{path}:{start}: {reason}; fix or delete that row")
                    skipped.append((start, reason))
                else:
                    yield start, {name: record[i] for i, name in keep}
            start = reader.line_num + 1


# safetensors names of the dtypes this project writes (the format's own spelling).
_SAFETENSORS_DTYPES = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32",
                       "torch.float64": "F64", "torch.int8": "I8", "torch.uint8": "U8", "torch.int16": "I16",
                       "torch.int32": "I32", "torch.int64": "I64", "torch.bool": "BOOL"}


def stream_safetensors(path: Path, specs: Iterable[tuple[str, tuple[int, ...], Any]], tensor_of: Any,
                       metadata: Optional[dict[str, str]] = None) -> int:
    """Write a `.safetensors` file one tensor at a time; returns the bytes written.

    `safetensors.torch.save_file` needs every tensor in memory at once: stage 6's dequantised base
    is 6.4 GB at MedGemma-4B shape, which a 32 GB workstation cannot hold beside everything else.
    The header needs only names, shapes and dtypes (`specs`), so it is written first and then each
    tensor is made by `tensor_of(name)` (a dequantised layer, on any device), copied to the CPU,
    written and dropped. The file is the format `safe_open` / `load_file` read."""
    import torch

    specs = [(name, tuple(int(d) for d in shape), dtype) for name, shape, dtype in specs]
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype in specs:
        if str(dtype) not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors name")
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[str(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with atomic_file(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for name, shape, dtype in specs:
            tensor = tensor_of(name)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, the header says {shape} {dtype}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            handle.write(memoryview(data.numpy()))
            del tensor, data
    return 8 + len(encoded) + offset
