import hashlib
import os
from pathlib import Path

import kormedgemma.core.manifest as manifest_module
from kormedgemma.core.config import apply_overrides, load_config
from kormedgemma.core.manifest import freshness, hash_path, read_manifest, write_artifact


def _make(tmp_path, config, source):
    final = tmp_path / "out"
    with write_artifact(final, "9.99", config, ["data.preprocess"], {"source": source}) as out:
        (out.path / "result.txt").write_text(source.read_text().upper())
        out.metrics["chars"] = len(source.read_text())
    return final


def test_hash_of_folder_follows_content_not_manifest(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    before = hash_path(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    assert hash_path(tmp_path) == before
    (tmp_path / "a.txt").write_text("two")
    assert hash_path(tmp_path) != before


def test_manifest_records_inputs_config_metrics_and_outputs(tmp_path):
    config = load_config("tiny", overrides={"paths.root": str(tmp_path)})
    source = tmp_path / "in.txt"
    source.write_text("hello")
    manifest = read_manifest(_make(tmp_path, config, source))
    assert manifest["inputs"]["source"]["sha256"] == hash_path(source)
    assert manifest["config"]["data.preprocess"]["min_chars"] == config.data.preprocess.min_chars
    assert manifest["metrics"] == {"chars": 5}
    assert manifest["outputs"] == {"result.txt": 5}
    assert manifest["versions"]["transformers"] and manifest["finished"] >= manifest["started"]


def test_fresh_until_input_or_config_changes(tmp_path):
    config = load_config("tiny", overrides={"paths.root": str(tmp_path)})
    source = tmp_path / "in.txt"
    source.write_text("hello")
    out = _make(tmp_path, config, source)
    assert freshness(out, config) == (True, "inputs and config unchanged")
    # A config key the step does not depend on leaves it fresh.
    assert freshness(out, apply_overrides(config, {"tokenizer.min_frequency": 99}))[0]
    changed, reason = freshness(out, apply_overrides(config, {"data.preprocess.seed": 5}))
    assert not changed and "config" in reason
    source.write_text("changed")
    changed, reason = freshness(out, config)
    assert not changed and "input source" in reason and "changed" in reason
    source.unlink()
    assert "gone" in freshness(out, config)[1]


def test_folder_without_manifest_is_never_fresh(tmp_path):
    config = load_config("tiny")
    (tmp_path / "half").mkdir()
    assert freshness(tmp_path / "half", config) == (False, f"{tmp_path / 'half'} has no manifest")


# --------------------------------------------------------------------------- hashes sealed once
PAST_NS = 1_600_000_000 * 10**9  # an mtime well before any manifest written by these tests


def _full_hash(path):
    """The content hash as defined (and as manifests written before sealing-time records hold it),
    computed by reading every byte."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"):
        digest.update(f"{file.relative_to(path)}\0{hashlib.sha256(file.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def _large_artifact(tmp_path, config):
    """A sealed folder artifact with a 4 MB file, whose files carry a fixed past mtime."""
    final = tmp_path / "models" / "big"
    with write_artifact(final, "9.98", config, [], {}) as out:
        (out.path / "weights.bin").write_bytes(bytes(range(256)) * (4 * 4096))
        (out.path / "sub").mkdir()
        (out.path / "sub" / "config.json").write_text('{"layers": 2}')
        for file in ("weights.bin", "sub/config.json"):
            os.utime(out.path / file, ns=(PAST_NS, PAST_NS))
    return final


def _count_reads(monkeypatch):
    """Record every file hash_path / write_artifact reads to hash it; a fresh process's state."""
    manifest_module._cached_digest.cache_clear()
    read, real = [], manifest_module._read_digest
    monkeypatch.setattr(manifest_module, "_read_digest", lambda path: (read.append(Path(path)), real(path))[1])
    return read


def _consumer(tmp_path, config, big):
    final = tmp_path / "models" / "consumer"
    inputs = {"big": big, "part": big / "sub", "one_file": big / "weights.bin"}
    with write_artifact(final, "9.99", config, ["data.preprocess"], inputs) as out:
        (out.path / "result.txt").write_text("made from big")
    return final


def test_manifest_records_each_sealed_file(tmp_path):
    config = load_config("tiny", overrides={"paths.root": str(tmp_path)})
    big = _large_artifact(tmp_path, config)
    files = read_manifest(big)["files"]
    assert set(files) == {"weights.bin", "sub/config.json"}
    weights = big / "weights.bin"
    # Renaming the temporary folder into place kept the mtime recorded when it was hashed.
    assert files["weights.bin"] == {"size": weights.stat().st_size, "mtime_ns": PAST_NS,
                                    "sha256": _full_hash(weights)}
    assert weights.stat().st_mtime_ns == PAST_NS


def test_second_start_over_a_large_artifact_reads_none_of_its_bytes(tmp_path, monkeypatch):
    config = load_config("tiny", overrides={"paths.root": str(tmp_path)})
    big = _large_artifact(tmp_path, config)
    assert (big / "weights.bin").stat().st_size >= 4 * 2**20
    read = _count_reads(monkeypatch)
    consumer = _consumer(tmp_path, config, big)
    # Sealing the consumer read its own output, and none of its input's bytes.
    assert not [p for p in read if big in p.parents], read
    inputs = read_manifest(consumer)["inputs"]
    assert inputs["big"]["sha256"] == _full_hash(big)
    assert inputs["part"]["sha256"] == _full_hash(big / "sub")
    assert inputs["one_file"]["sha256"] == _full_hash(big / "weights.bin")

    # A later start (a new process: nothing cached) reads no file at all to find both fresh.
    read = _count_reads(monkeypatch)
    assert freshness(consumer, config) == (True, "inputs and config unchanged")
    assert freshness(big, config) == (True, "inputs and config unchanged")
    assert hash_path(big) == _full_hash(big)
    assert hash_path(big / "sub" / "config.json") == _full_hash(big / "sub" / "config.json")
    assert read == []


def test_touched_file_is_read_again_and_changed_content_is_stale(tmp_path, monkeypatch):
    config = load_config("tiny", overrides={"paths.root": str(tmp_path)})
    big = _large_artifact(tmp_path, config)
    consumer = _consumer(tmp_path, config, big)
    weights = big / "weights.bin"

    # Only its mtime changed: read again (only that file), and still the same content.
    os.utime(weights, ns=(PAST_NS + 10**9, PAST_NS + 10**9))
    read = _count_reads(monkeypatch)
    assert freshness(consumer, config)[0]
    assert {p.name for p in read} == {"weights.bin"}
    assert hash_path(big) == _full_hash(big)

    # Same size, new content, another mtime: stale.
    data = bytearray(weights.read_bytes())
    data[123] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(PAST_NS + 2 * 10**9, PAST_NS + 2 * 10**9))
    _count_reads(monkeypatch)
    fresh, reason = freshness(consumer, config)
    assert not fresh and "input big" in reason and "changed" in reason
    assert hash_path(big) == _full_hash(big)

    # A new size with the recorded mtime put back: stale too.
    weights.write_bytes(bytes(data) + b"more")
    os.utime(weights, ns=(PAST_NS, PAST_NS))
    _count_reads(monkeypatch)
    assert not freshness(consumer, config)[0]
    assert hash_path(big / "weights.bin") == _full_hash(big / "weights.bin")


def test_file_not_older_than_its_manifest_is_read_again(tmp_path, monkeypatch):
    """A file sealed in the clock tick of its manifest could be rewritten keeping its mtime."""
    config = load_config("tiny", overrides={"paths.root": str(tmp_path)})
    final = tmp_path / "models" / "racy"
    future = 4_000_000_000 * 10**9
    with write_artifact(final, "9.98", config, [], {}) as out:
        (out.path / "a.txt").write_text("a")
        (out.path / "b.txt").write_text("b")
        os.utime(out.path / "a.txt", ns=(PAST_NS, PAST_NS))
        os.utime(out.path / "b.txt", ns=(future, future))
    assert read_manifest(final)["files"]["b.txt"]["mtime_ns"] == future
    read = _count_reads(monkeypatch)
    assert hash_path(final) == _full_hash(final)
    assert [p.name for p in read] == ["b.txt"]


def test_single_file_artifact_digest_comes_from_the_manifest_beside_it(tmp_path, monkeypatch):
    config = load_config("tiny", overrides={"paths.root": str(tmp_path)})
    final = tmp_path / "models" / "new_tokens.json"
    with write_artifact(final, "9.98", config, [], {}) as out:
        (out.path / final.name).write_text('{"pieces": ["가", "나"]}', encoding="utf-8")
        os.utime(out.path / final.name, ns=(PAST_NS, PAST_NS))
    assert read_manifest(final)["files"][final.name]["sha256"] == _full_hash(final)
    read = _count_reads(monkeypatch)
    assert hash_path(final) == _full_hash(final)
    assert read == []
    final.write_text('{"pieces": ["가"]}', encoding="utf-8")
    assert hash_path(final) == _full_hash(final)
    assert read == [final.resolve()]


def test_unsealed_files_are_read_once_per_process(tmp_path, monkeypatch):
    """User-supplied data (no manifest), or an artifact sealed before files were recorded."""
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "corpus.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.bin").write_bytes(b"weights")
    (tmp_path / "old" / "manifest.json").write_text('{"outputs": {"model.bin": 7}}')
    read = _count_reads(monkeypatch)
    for folder in ("local", "old"):
        assert hash_path(tmp_path / folder) == _full_hash(tmp_path / folder)
        assert hash_path(tmp_path / folder) == _full_hash(tmp_path / folder)
    assert sorted(p.name for p in read) == ["corpus.jsonl", "model.bin"]


def test_a_field_added_later_leaves_older_artifacts_fresh_at_its_old_behaviour(tmp_path):
    """An artifact whose manifest hashed `data.preprocess` before `korean_train_share` existed stays
    fresh while the field keeps its old behaviour (1.0), and goes stale at any other share."""
    import json

    from kormedgemma.core.config import config_hash, config_to_dict

    config = load_config("tiny", overrides={"paths.root": str(tmp_path)})
    source = tmp_path / "in.txt"
    source.write_text("hello")
    out = _make(tmp_path, config, source)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    older = {k: v for k, v in config_to_dict(config.data.preprocess).items() if k != "korean_train_share"}
    assert manifest["config"]["data.preprocess"] == older  # as a manifest written before the field reads
    assert manifest["config_hash"] == config_hash({"data.preprocess": older})
    assert freshness(out, config)[0]
    stale, reason = freshness(out, apply_overrides(config, {"data.preprocess.korean_train_share": 0.5}))
    assert not stale and "config" in reason
