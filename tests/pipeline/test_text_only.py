"""A text-only Gemma 3 (`Gemma3ForCausalLM`: Gemma 3 270M/1B, MedGemma-27B-text) as the base."""
import pytest

from kormedgemma.core.config import load_config
from kormedgemma.modeling.base_model import build_base_artifact, decoder_layers, load_model, model_class


@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_only")
    config = load_config("tiny", overrides={"paths.root": str(root), "base.tiny.text_only": True})
    return config, build_base_artifact(config)


def test_the_tiny_base_can_be_text_only_and_loads_as_a_causal_lm(text_only):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, folder = text_only
    model = load_model(config)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model_class(folder) is AutoModelForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "<image_soft_token>" not in tokenizer.get_vocab()  # no image token without a vision tower
    assert len(decoder_layers(model)) == config.base.tiny.num_hidden_layers
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_lora_finds_the_decoder_projections_of_a_text_only_model(text_only):
    from kormedgemma.training.stages import lora_target_modules

    config, _ = text_only
    names = lora_target_modules(load_model(config), config.staged.stage6.lora)
    assert names and all(name.startswith("model.layers.") for name in names)
    assert len(names) == config.base.tiny.num_hidden_layers * len(config.staged.stage6.lora.target_modules)


@pytest.mark.notebooks
@pytest.mark.slow
def test_a_text_only_base_runs_the_whole_tiny_pipeline(tmp_path):
    import json

    from kormedgemma.pipeline.runner import run_pipeline
    from kormedgemma.pipeline.steps import STEPS

    overrides = {"paths.root": str(tmp_path), "base.tiny.text_only": True}
    outcomes = run_pipeline("tiny", overrides=overrides, echo=lambda *_: None)
    assert [(o.id, o.status) for o in outcomes] == [(s.id, "ran") for s in STEPS]
    for folder in ("base", "initialized", "staged_training/merged", "final/instruct", "final/korean_medgemma_awq"):
        architectures = json.loads((tmp_path / "models" / folder / "config.json").read_text(encoding="utf-8"))["architectures"]
        assert architectures == ["Gemma3ForCausalLM"], folder
