"""`manifest.json` beside every output: what went in, with which config, and what came out.

The runner skips a notebook when every output's manifest records the same input hashes and the
same config (the keys that step declared) as now, so a resumed week-long run redoes only what
changed. A folder without a manifest is treated as absent: the manifest is written last, inside
the atomic write, so its presence means the artifact is complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from kormedgemma.config import ProjectConfig, config_hash, config_to_dict, repo_root
from kormedgemma.io import atomic_dir, write_json

MANIFEST = "manifest.json"


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names + their digests, manifest excluded)."""
    path = Path(path)
    if path.is_file():
        return _file_digest(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(f"{file.relative_to(path)}\0{_file_digest(file)}\n".encode("utf-8"))
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return _cached_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8192)
def _cached_digest(path: str, size: int, mtime_ns: int) -> str:
    """Keyed by size and mtime: the runner checks every step's manifests at each start, and the same
    inputs (a corpus, an 8.6 GB model folder) appear in several of them."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def select_config(config: ProjectConfig, keys: list[str]) -> dict[str, Any]:
    """The config sections (dotted keys) a step depends on, as plain data."""
    data = config_to_dict(config)
    selected = {}
    for key in keys:
        node: Any = data
        for part in key.split("."):
            node = node[part]
        selected[key] = node
    return selected


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("kormedgemma", "torch", "transformers", "tokenizers", "sentencepiece", "datasets",
                 "peft", "accelerate"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclasses.dataclass
class OutputArtifact:
    """What a step is writing: its temporary folder and the metrics that go in its manifest."""

    path: Path
    metrics: dict[str, Any]


FILE_SUFFIXES = (".json", ".jsonl", ".tsv")


def is_file_artifact(final: Path) -> bool:
    return Path(final).suffix in FILE_SUFFIXES


def manifest_path(final: Path) -> Path:
    """`<folder>/manifest.json`, or `<name>.manifest.json` beside a single-file artifact."""
    final = Path(final)
    return final.parent / f"{final.stem}.{MANIFEST}" if is_file_artifact(final) else final / MANIFEST


@contextlib.contextmanager
def write_artifact(final: Path, step: str, config: ProjectConfig, config_keys: list[str],
                   inputs: Mapping[str, Path]) -> Iterator[OutputArtifact]:
    """Build an artifact atomically and seal it with its manifest.

    `inputs` maps a name to a file or folder whose content hash is recorded (and checked by the
    runner next time); `config_keys` are the dotted config sections that shape this output.
    A folder artifact is written into `out.path`; a single-file artifact (`new_tokens.json`) is
    written as `out.path / final.name`, and its manifest lands beside it.
    """
    started = time.time()
    final = Path(final)
    input_hashes = {name: {"path": _display(Path(p)), "sha256": hash_path(Path(p))}
                    for name, p in inputs.items()}
    if is_file_artifact(final):
        with atomic_dir(final.parent / f".build-{final.name}") as tmp:
            out = OutputArtifact(path=tmp, metrics={})
            yield out
            produced = tmp / final.name
            if not produced.is_file():
                raise FileNotFoundError(f"step {step} did not write {final.name}")
            manifest_path(final).unlink(missing_ok=True)  # stale until the new one is sealed
            os.replace(produced, final)
            write_json(manifest_path(final), _manifest(final, step, config, config_keys, input_hashes,
                                                       {final.name: final.stat().st_size}, out.metrics, started))
        shutil.rmtree(final.parent / f".build-{final.name}", ignore_errors=True)
        return
    with atomic_dir(final) as tmp:
        out = OutputArtifact(path=tmp, metrics={})
        yield out
        outputs = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / MANIFEST, _manifest(final, step, config, config_keys, input_hashes, outputs,
                                             out.metrics, started))


def _manifest(final: Path, step: str, config: ProjectConfig, config_keys: list[str],
              input_hashes: dict[str, Any], outputs: dict[str, int], metrics: dict[str, Any],
              started: float) -> dict[str, Any]:
    finished = time.time()
    return {
        "artifact": _display(Path(final)),
        "step": step,
        "profile": config.profile,
        "inputs": input_hashes,
        "config_keys": config_keys,
        "config_hash": config_hash(select_config(config, config_keys)),
        "config": select_config(config, config_keys),
        "outputs": outputs,
        "metrics": metrics,
        "git_commit": git_commit(),
        "versions": library_versions(),
        "started": _iso(started),
        "finished": _iso(finished),
        "seconds": round(finished - started, 3),
    }


def read_manifest(artifact: Path) -> Optional[dict[str, Any]]:
    path = manifest_path(artifact)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def freshness(folder: Path, config: ProjectConfig) -> tuple[bool, str]:
    """(True, reason) when `folder`'s manifest matches the current inputs and config."""
    manifest = read_manifest(folder)
    if manifest is None:
        return False, f"{_display(Path(folder))} has no manifest"
    if manifest.get("profile") != config.profile:
        return False, f"{_display(Path(folder))} was made with profile {manifest.get('profile')!r}"
    try:
        current = config_hash(select_config(config, manifest.get("config_keys", [])))
    except KeyError:
        return False, "config layout changed"
    if current != manifest.get("config_hash"):
        return False, f"config of {_display(Path(folder))} changed"
    for name, entry in manifest.get("inputs", {}).items():
        path = _undisplay(entry["path"])
        if not path.exists():
            return False, f"input {name} ({entry['path']}) is gone"
        if hash_path(path) != entry["sha256"]:
            return False, f"input {name} ({entry['path']}) changed"
    return True, "inputs and config unchanged"


def _display(path: Path) -> str:
    """Paths in manifests are relative to the repo when they can be: checkouts move."""
    try:
        return str(path.resolve().relative_to(repo_root()))
    except ValueError:
        return str(path.resolve())


def _undisplay(text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else repo_root() / path


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")
