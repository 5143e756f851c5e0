from kormedgemma.config import apply_overrides, load_config
from kormedgemma.manifest import freshness, hash_path, read_manifest, write_artifact


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
