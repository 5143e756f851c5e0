"""`manifest.json` beside every output: what went in, with which config, and what came out.

The runner skips a notebook when every output's manifest records the same input hashes and the
same config (the keys that step declared) as now, so a resumed week-long run redoes only what
changed. A folder without a manifest is treated as absent: the manifest is written last, inside
the atomic write, so its presence means the artifact is complete.

Content hashes are computed once, when an artifact is sealed: its manifest records each of its
files' size, mtime and sha256 (`files`). Hashing that artifact later (as another step's input, at
every runner start) reads only the files whose size or mtime no longer match that record, so a
start over tens of GB of corpora and models costs a few stat calls instead of minutes of reading.
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

from kormedgemma.core.config import ProjectConfig, config_hash, config_to_dict, repo_root
from kormedgemma.core.io import atomic_dir, write_json

MANIFEST = "manifest.json"


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names + their digests, manifest excluded).

    A file that the manifest of the sealed artifact holding it records with its current size and
    mtime is not read: its digest is the recorded one (`_SealedFiles`). Any other file (changed
    since sealing, or user-supplied data) is read, once per process for a given size and mtime."""
    path = Path(path)
    sealed = _SealedFiles()
    if path.is_file():
        return _file_digest(path, sealed)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(f"{file.relative_to(path)}\0{_file_digest(file, sealed)}\n".encode("utf-8"))
    return digest.hexdigest()


def _file_digest(path: Path, sealed: Optional["_SealedFiles"] = None) -> str:
    stat = path.stat()
    recorded = sealed.digest(path, stat) if sealed is not None else None
    if recorded is not None:
        return recorded
    return _cached_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8192)
def _cached_digest(path: str, size: int, mtime_ns: int) -> str:
    """Keyed by size and mtime: the runner checks every step's manifests at each start, and the same
    inputs (a corpus, an 8.6 GB model folder) appear in several of them."""
    return _read_digest(Path(path))


def _read_digest(path: Path) -> str:
    """sha256 of a file's bytes: the only place that reads a file to hash it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _seal_files(root: Path, files: list[Path]) -> dict[str, dict[str, Any]]:
    """`files` of a manifest: {name relative to `root`: size, mtime_ns, sha256} of each file.

    Hashed before the manifest is written, so no recorded mtime is later than the manifest's own
    (see `_SealedFiles`). A file that changes while it is hashed is left unrecorded (read later)."""
    records = {}
    for file in files:
        before = file.stat()
        digest = _read_digest(file)
        after = file.stat()
        if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
            records[file.relative_to(root).as_posix()] = {"size": after.st_size, "mtime_ns": after.st_mtime_ns,
                                                          "sha256": digest}
    return records


class _SealedFiles:
    """Finds a file's record in the manifest of the sealed artifact that holds it, for one hash_path.

    The sealing manifest is `<name>.manifest.json` beside a single-file artifact, else the nearest
    `manifest.json` in the file's folder or above it (inputs are often a part of an artifact: a
    corpus split, one model file). A record is used only when the file's size and mtime_ns equal
    the recorded ones and that mtime is older than the manifest's own: a file rewritten within the
    clock tick in which it was sealed could keep its mtime (git's "racily clean" entries), so such
    a file is read instead. Content changed while size and mtime are kept (or set back) goes
    unnoticed, as with make and rsync."""

    def __init__(self) -> None:
        self._folders: dict[Path, Optional[tuple[Path, Mapping[str, Any], int]]] = {}

    def digest(self, file: Path, stat: os.stat_result) -> Optional[str]:
        file = Path(os.path.abspath(file))
        found = self._single(file) if is_file_artifact(file) else None
        if found is None:
            found = self._enclosing(file.parent)
        if found is None:
            return None
        root, records, manifest_mtime_ns = found
        record = records.get(file.relative_to(root).as_posix())
        if (isinstance(record, dict) and record.get("size") == stat.st_size
                and record.get("mtime_ns") == stat.st_mtime_ns and stat.st_mtime_ns < manifest_mtime_ns
                and isinstance(record.get("sha256"), str)):
            return record["sha256"]
        return None

    @staticmethod
    def _single(file: Path) -> Optional[tuple[Path, Mapping[str, Any], int]]:
        loaded = _load_records(manifest_path(file))
        return (file.parent, *loaded) if loaded is not None else None

    def _enclosing(self, folder: Path) -> Optional[tuple[Path, Mapping[str, Any], int]]:
        if folder not in self._folders:
            manifest = folder / MANIFEST
            if manifest.is_file():
                loaded = _load_records(manifest)
                self._folders[folder] = (folder, *loaded) if loaded is not None else None
            else:
                self._folders[folder] = None if folder.parent == folder else self._enclosing(folder.parent)
        return self._folders[folder]


def _load_records(manifest: Path) -> Optional[tuple[Mapping[str, Any], int]]:
    """(files records, the manifest's mtime_ns), or None when `manifest` is absent or records none."""
    try:
        stat = manifest.stat()
    except OSError:
        return None
    records = _cached_records(str(manifest), stat.st_size, stat.st_mtime_ns)
    return (records, stat.st_mtime_ns) if records is not None else None


@functools.lru_cache(maxsize=256)
def _cached_records(manifest: str, size: int, mtime_ns: int) -> Optional[Mapping[str, Any]]:
    try:
        data = json.loads(Path(manifest).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else None


# Fields added to a config section after runs already had artifacts made under it, with the value
# that reproduces what those artifacts were made with. At that value a field is left out of the
# section a step hashes, so adding it does not send every existing run back through its steps
# (0.04 at the a5000 size takes hours); any other value is hashed as usual.
LATER_FIELDS: dict[str, Any] = {
    "data.preprocess.korean_train_share": 1.0,
    "evaluation.english_bits_tolerance": 0.02,
    **{f"staged.stage{k}.eval_chars": None for k in range(1, 8)},
}


def _without_later_fields(node: Any, path: str) -> Any:
    if not isinstance(node, dict):
        return node
    return {name: _without_later_fields(value, f"{path}.{name}") for name, value in node.items()
            if not (f"{path}.{name}" in LATER_FIELDS and value == LATER_FIELDS[f"{path}.{name}"])}


def select_config(config: ProjectConfig, keys: list[str]) -> dict[str, Any]:
    """The config sections (dotted keys) a step depends on, as plain data (LATER_FIELDS at their
    old behaviour's value left out of the sections that hold them)."""
    data = config_to_dict(config)
    selected = {}
    for key in keys:
        node: Any = data
        for part in key.split("."):
            node = node[part]
        selected[key] = _without_later_fields(node, key)
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
            files = _seal_files(tmp, [produced])  # a rename keeps the mtime recorded here
            manifest_path(final).unlink(missing_ok=True)  # stale until the new one is sealed
            os.replace(produced, final)
            write_json(manifest_path(final), _manifest(final, step, config, config_keys, input_hashes,
                                                       {final.name: final.stat().st_size}, files, out.metrics,
                                                       started))
        shutil.rmtree(final.parent / f".build-{final.name}", ignore_errors=True)
        return
    with atomic_dir(final) as tmp:
        out = OutputArtifact(path=tmp, metrics={})
        yield out
        outputs = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        # Hashed in the temporary folder: renaming it into place keeps its files' mtimes.
        files = _seal_files(tmp, sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST))
        write_json(tmp / MANIFEST, _manifest(final, step, config, config_keys, input_hashes, outputs, files,
                                             out.metrics, started))


def _manifest(final: Path, step: str, config: ProjectConfig, config_keys: list[str],
              input_hashes: dict[str, Any], outputs: dict[str, int], files: dict[str, dict[str, Any]],
              metrics: dict[str, Any], started: float) -> dict[str, Any]:
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
        "files": files,  # per file: size, mtime_ns, sha256 when sealed (hash_path trusts these)
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
