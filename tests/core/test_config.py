from pathlib import Path

import pytest

from config.training_config import ConfigError
from kormedgemma.core.config import apply_overrides, config_hash, load_config, resolve_input, resolve_path


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown profile 'a6000'; known profiles: a5000, gemma3_270m, tiny"):
        load_config("a6000")


def test_tiny_reads_only_bundled_files_and_a5000_reads_the_hub():
    """The tiny profile must run with no network: every input it names is a file in this checkout.
    The a5000 profile must not quietly read the bundled samples as if they were the real data."""
    tiny, real = load_config("tiny"), load_config("a5000")
    local = [s.local_path for s in tiny.data.sources.values()] + [tiny.data.kormedmcqa.local_path,
                                                                 tiny.evaluation.english_local_path]
    assert tiny.base.build_tiny and all(p and resolve_input(tiny, p).exists() for p in local), local
    assert not any(s.hub_id and not s.local_path for s in tiny.data.sources.values())
    assert not real.base.build_tiny and "/" in real.base.model and not Path(real.base.model).exists()
    hub = {k for k, s in real.data.sources.items() if s.hub_id}
    assert {real.data.sources[k].language for k in hub} == {"ko", "en"}
    assert all(real.data.sources[k].local_path is None for k in hub)
    # beside the Hub corpora, only the project's own bundled text (written here, licensed with it)
    assert all(s.local_path.startswith("data/samples/") for k, s in real.data.sources.items() if k not in hub)
    assert real.data.kormedmcqa.local_path is None and real.evaluation.english_local_path is None
    # stage 6 of the real run trains on a 4-bit base with an adapter (QLoRA); stage 7 keeps the adapter only
    assert real.staged.stage6.load_in_4bit and real.staged.stage6.lora is not None


def test_unknown_key_is_named_with_its_neighbours():
    with pytest.raises(ConfigError, match=r"unknown key 'tokenizer.min_freq'.*min_frequency"):
        load_config("tiny", overrides={"tokenizer.min_freq": 3})


def test_wrong_type_is_rejected_with_the_key():
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size: must be an integer \(got 'big'\)"):
        load_config("tiny", overrides={"tokenizer.vocab_size": "big"})
    with pytest.raises(ConfigError, match=r"base.build_tiny: must be true or false"):
        load_config("tiny", overrides={"base.build_tiny": 1})


def test_impossible_value_is_rejected_before_work():
    with pytest.raises(ConfigError, match=r"tokenizer.min_frequency: must be ≥ 1 \(got 0\)"):
        load_config("tiny", overrides={"tokenizer.min_frequency": 0})
    with pytest.raises(ConfigError, match=r"staged.stage3.seq_len: must be ≥ 1"):
        load_config("tiny", overrides={"staged.stage3.seq_len": 0})
    with pytest.raises(ConfigError, match=r"embeddings.method: must be one of"):
        load_config("tiny", overrides={"embeddings.method": "magic"})


def test_overrides_apply_and_integers_widen_to_float():
    config = load_config("tiny", overrides={"staged.stage1.learning_rate": 1, "data.preprocess.seed": 7})
    assert config.staged.stage1.learning_rate == 1.0 and isinstance(config.staged.stage1.learning_rate, float)
    assert config.data.preprocess.seed == 7


def test_learning_rates_written_as_exponents_are_numbers(tmp_path):
    from kormedgemma.core.config import parse_overrides

    overrides = parse_overrides(["staged.stage4.learning_rate=2e-5", "staged.stage5.learning_rate=5E-05"])
    assert overrides["staged.stage4.learning_rate"] == "2e-5"  # what YAML 1.1 hands over: a string
    config = load_config("tiny", overrides=overrides)
    assert config.staged.stage4.learning_rate == 2e-5 and config.staged.stage5.learning_rate == 5e-5
    path = tmp_path / "rates.yaml"
    path.write_text("staged:\n  stage1:\n    learning_rate: 1e-4\n", encoding="utf-8")
    assert load_config("tiny", config_file=path).staged.stage1.learning_rate == 1e-4
    with pytest.raises(ConfigError, match=r"staged.stage4.learning_rate: must be a number \(got 'fast'\)"):
        load_config("tiny", overrides={"staged.stage4.learning_rate": "fast"})
    with pytest.raises(ConfigError, match=r"must be a finite number \(got 'nan'\)"):
        load_config("tiny", overrides={"staged.stage4.learning_rate": "nan"})


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("tokenizer:\n  min_frequency: 9\n  max_new_tokens: 50\n", encoding="utf-8")
    config = load_config("tiny", overrides={"tokenizer.max_new_tokens": 70}, config_file=path)
    assert (config.tokenizer.min_frequency, config.tokenizer.max_new_tokens) == (9, 70)


def test_bad_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config("tiny", config_file=path)
    with pytest.raises(ConfigError, match="not found"):
        load_config("tiny", config_file=tmp_path / "missing.yaml")


def test_a_new_source_can_be_added_by_override():
    config = load_config("tiny", overrides={"data.sources.my_corpus": {"language": "ko", "local_path": "/x.txt"}})
    assert config.data.sources["my_corpus"].local_path == "/x.txt"
    with pytest.raises(ConfigError, match="a source needs hub_id or local_path"):
        load_config("tiny", overrides={"data.sources.broken": {"language": "ko"}})


def test_config_hash_tracks_values():
    config = load_config("tiny")
    changed = apply_overrides(config, {"data.preprocess.seed": 1})
    assert config_hash(config.data.preprocess) != config_hash(changed.data.preprocess)
    assert config_hash(config.tokenizer) == config_hash(changed.tokenizer)


def test_root_moves_artifacts_but_not_bundled_inputs(tmp_path):
    config = load_config("tiny", overrides={"paths.root": str(tmp_path)})
    assert resolve_path(config, "models/base") == tmp_path / "models/base"
    bundled = resolve_input(config, "data/samples/korean_medical.txt")
    assert bundled.is_file() and tmp_path not in bundled.parents
