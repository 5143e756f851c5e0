"""Phase 2: base rows untouched, lm_head untied, new rows exactly as each method defines them."""
import copy
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer, Gemma3ForCausalLM

from config.training_config import EmbeddingConfig
from kormedgemma.core.artifacts import artifact_path
from kormedgemma.modeling.base_model import check_tokenizer_matches_model
from kormedgemma.vocab.embeddings import initialize_new_rows, is_untied, procrustes, resize_for_tokenizer, softmax_weights


@pytest.fixture(scope="module")
def models(tiny_phase2):
    config, _, _ = tiny_phase2
    base = AutoModelForImageTextToText.from_pretrained(artifact_path(config, "base_model"))
    initialized = AutoModelForImageTextToText.from_pretrained(artifact_path(config, "initialized_model"))
    base_tok = AutoTokenizer.from_pretrained(artifact_path(config, "base_model"))
    merged_tok = AutoTokenizer.from_pretrained(artifact_path(config, "initialized_model"))
    return config, base, initialized, base_tok, merged_tok


def _rows(model):
    return model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()


def _base_pieces(base_tok, merged_tok, token_id):
    """The base tokenizer's pieces of a new token's text: what EEVE averages."""
    text = merged_tok.convert_tokens_to_string([merged_tok.convert_ids_to_tokens(token_id)])
    return base_tok.encode(text, add_special_tokens=False)


def test_old_rows_are_bit_identical_in_and_out(models):
    _, base, initialized, base_tok, _ = models
    n = len(base_tok)
    base_in, _ = _rows(base)
    new_in, new_out = _rows(initialized)
    assert torch.equal(new_in[:n], base_in[:n])
    assert torch.equal(new_out[:n], base_in[:n])  # the base lm_head was the same (tied) matrix


def test_new_rows_were_written_and_rows_padded_to_64(models):
    _, base, initialized, base_tok, merged_tok = models
    new_in, new_out = _rows(initialized)
    assert new_in.shape[0] % 64 == 0 and new_in.shape[0] >= len(merged_tok) and new_in.shape == new_out.shape
    base_in, _ = _rows(base)
    # Free padding rows of the base (ids len(base_tok)..rows-1) now hold new tokens.
    assert not torch.equal(new_in[len(base_tok):base_in.shape[0]], base_in[len(base_tok):])
    assert initialized.config.text_config.vocab_size == new_in.shape[0]


def test_untied_after_save_and_reload(models):
    config, _, initialized, _, _ = models
    assert is_untied(initialized)
    saved = json.loads((artifact_path(config, "initialized_model") / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False and saved["text_config"]["tie_word_embeddings"] is False
    model = copy.deepcopy(initialized)
    before = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        model.get_output_embeddings().weight[5] += 1.0
    assert torch.equal(model.get_input_embeddings().weight, before)


def test_resizing_appends_the_same_rows_every_time_and_leaves_the_global_generator_alone(models):
    """The padding rows past the last token keep what resizing drew and enter every softmax: an
    unseeded draw made two runs of one config train differently."""
    _, base, _, base_tok, merged_tok = models
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    appended = []
    for draw in range(2):
        torch.manual_seed(123)
        if draw:
            torch.rand(5)  # a caller whose generator is elsewhere gets the same rows
        model = copy.deepcopy(base)
        resize_for_tokenizer(model, len(merged_tok), 64)
        if not draw:
            assert torch.equal(torch.rand(3), expected_next)  # the caller's stream did not move
        new_in, new_out = _rows(model)
        appended.append((new_in[base.get_input_embeddings().weight.shape[0]:].clone(),
                         new_out[base.get_input_embeddings().weight.shape[0]:].clone()))
    assert appended[0][0].shape[0] > 0 and appended[0][0].abs().sum() > 0
    assert torch.equal(appended[0][0], appended[1][0]) and torch.equal(appended[0][1], appended[1][1])


def test_eeve_rows_equal_the_formula(models):
    _, base, _, base_tok, merged_tok = models
    model = copy.deepcopy(base)
    resize_for_tokenizer(model, len(merged_tok), 64)
    initialize_new_rows(model, base_tok, merged_tok, EmbeddingConfig(method="eeve", output_rows="method"))
    base_in, _ = _rows(base)
    new_in, new_out = _rows(model)
    for token_id in range(len(base_tok), len(merged_tok), 37):
        pieces = _base_pieces(base_tok, merged_tok, token_id)
        assert torch.allclose(new_in[token_id], base_in[pieces].mean(dim=0), atol=0, rtol=0)
        assert torch.equal(new_out[token_id], base_in[pieces[0]])


def test_output_rows_can_be_the_subword_mean_or_the_base_mean_input_rows_unchanged(models):
    _, base, _, base_tok, merged_tok = models
    eeve = copy.deepcopy(base)
    resize_for_tokenizer(eeve, len(merged_tok), 64)
    initialize_new_rows(eeve, base_tok, merged_tok, EmbeddingConfig(method="eeve"))
    base_in, _ = _rows(base)
    base_rows = base_in[:len(base_tok)]  # tied in the base: its output rows are these
    for kind in ("subword_mean", "base_mean"):
        model = copy.deepcopy(base)
        resize_for_tokenizer(model, len(merged_tok), 64)
        initialize_new_rows(model, base_tok, merged_tok, EmbeddingConfig(method="eeve", output_rows=kind))
        new_in, new_out = _rows(model)
        assert torch.equal(new_in[:len(merged_tok)], _rows(eeve)[0][:len(merged_tok)])  # only lm_head rows differ
        for token_id in range(len(base_tok), len(merged_tok), 37):
            pieces = _base_pieces(base_tok, merged_tok, token_id)
            expected = base_rows[pieces].mean(dim=0) if kind == "subword_mean" else base_rows.mean(dim=0)
            assert torch.allclose(new_out[token_id], expected, atol=1e-6, rtol=0), (kind, token_id)
        assert torch.equal(new_out[:len(base_tok)], base_rows)


def test_init_report_lists_every_new_token_and_its_route(models):
    config, _, _, base_tok, merged_tok = models
    report = json.loads((artifact_path(config, "initialized_model") / "init_report.json").read_text())
    assert report["new_ids"] == list(range(len(base_tok), len(merged_tok)))
    assert sum(report["coverage"].values()) == len(report["new_ids"])
    sample = report["neighbours"]
    assert len(sample) >= 20 and all(row["token"] == merged_tok.convert_ids_to_tokens(row["id"]) for row in sample)
    assert {row["route"] for row in sample} <= {"knn", "dictionary"}


def test_softmax_weights_sum_to_one_and_follow_similarity():
    weights = softmax_weights(np.array([0.9, 0.5, 0.1]), temperature=0.1)
    assert weights.sum() == pytest.approx(1.0) and (weights > 0).all() and weights[0] > weights[1] > weights[2]
    assert np.allclose(softmax_weights(np.array([0.9, 0.5, 0.1]), temperature=1e6), 1 / 3)


def test_wechsel_neighbours_reproduce_each_row(tiny_phase1):
    """Run WECHSEL alone and check every new row is Σ w_i · base_row_i with Σ w_i = 1, w_i ≥ 0."""
    from kormedgemma.data.dictionary import DICTIONARY_FILE, load_dictionary
    from kormedgemma.data.readers import read_split
    from kormedgemma.vocab.embeddings import CenteredVectors, align, train_word_vectors, wechsel_rows

    config, _, _ = tiny_phase1
    base_tok = AutoTokenizer.from_pretrained(artifact_path(config, "base_model"))
    merged_tok = AutoTokenizer.from_pretrained(artifact_path(config, "merged_tokenizer"))
    base = AutoModelForImageTextToText.from_pretrained(artifact_path(config, "base_model"))
    base_in = base.get_input_embeddings().weight.detach()[: len(base_tok)]
    pairs = [(ko, en) for ko, en, _ in load_dictionary(artifact_path(config, "dictionary") / DICTIONARY_FILE)]
    ko = CenteredVectors(train_word_vectors(read_split(artifact_path(config, "korean"), "train"), 16, 5, 0))
    en = CenteredVectors(train_word_vectors(read_split(artifact_path(config, "english"), "train"), 16, 5, 0))
    new_ids = list(range(len(base_tok), len(merged_tok)))
    result = wechsel_rows(base_tok, merged_tok, new_ids, base_in, base_in, ko, en, align(ko, en, pairs), {},
                          EmbeddingConfig(wechsel_k=7, wechsel_temperature=0.1))
    assert len(result.route) > 0.9 * len(new_ids) and set(result.route.values()) == {"knn"}
    for token_id, neighbours in result.neighbours.items():
        ids = [i for i, _ in neighbours]
        weights = torch.tensor([w for _, w in neighbours])
        assert len(ids) == 7 and all(i < len(base_tok) for i in ids)
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6) and bool((weights >= 0).all())
        assert torch.allclose(result.rows_input[token_id], (weights[:, None] * base_in[ids]).sum(0), atol=1e-6)
    # Matrices on another device than the CPU (the init ablation's model on the GPU failed here with
    # "found at least two devices, cuda:0 and cpu"): the rows are made on the matrices' device.
    meta = base_in.to("meta")
    on_meta = wechsel_rows(base_tok, merged_tok, new_ids, meta, meta, ko, en, align(ko, en, pairs), {},
                           EmbeddingConfig(wechsel_k=7, wechsel_temperature=0.1))
    assert on_meta.route == result.route
    assert {row.device.type for row in on_meta.rows_input.values()} == {"meta"}


def test_hybrid_blends_eeve_and_wechsel_and_reports_coverage(tiny_phase2):
    _, _, figures = tiny_phase2
    assert figures["method"] == "hybrid" and figures["untied"]
    assert sum(figures["coverage"].values()) == figures["new_tokens"]
    assert figures["coverage"].get("wechsel_dictionary", 0) > 0  # dictionary terms among the new pieces
    assert figures["alignment"]["pairs_used"] >= 300


@pytest.mark.parametrize("method", ["mean", "random"])
def test_baselines_touch_only_new_rows(models, method):
    _, base, _, base_tok, merged_tok = models
    model = copy.deepcopy(base)
    resize_for_tokenizer(model, len(merged_tok), 64)
    report = initialize_new_rows(model, base_tok, merged_tok, EmbeddingConfig(method=method))
    base_in, _ = _rows(base)
    new_in, new_out = _rows(model)
    n = len(base_tok)
    assert torch.equal(new_in[:n], base_in[:n]) and torch.equal(new_out[:n], base_in[:n])
    assert report.coverage == {method: len(merged_tok) - n}
    if method == "mean":
        assert torch.allclose(new_in[n:len(merged_tok)].mean(0), base_in[:n].mean(0), atol=1e-3)
    else:
        assert abs(float(new_in[n:len(merged_tok)].std()) - 0.02) < 0.005


def test_logits_over_the_old_vocabulary_are_unchanged_for_english(models):
    _, base, initialized, base_tok, merged_tok = models
    text = "Hypertension is a major risk factor for stroke and heart failure."
    ids = merged_tok(text, return_tensors="pt").input_ids
    assert torch.equal(ids, base_tok(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        before = base(input_ids=ids).logits[..., : len(base_tok)]
        after = initialized(input_ids=ids).logits[..., : len(base_tok)]
    assert torch.equal(before, after)


def test_initialized_model_generates_with_the_merged_tokenizer(models):
    _, _, initialized, _, merged_tok = models
    check_tokenizer_matches_model(merged_tok, initialized)
    inputs = merged_tok("고혈압 환자는", return_tensors="pt")
    output = initialized.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] == inputs.input_ids.shape[1] + 5


def test_wrong_tokenizer_for_the_model_is_a_clear_error(models):
    _, base, _, base_tok, merged_tok = models
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model only 1088 embedding rows"):
        check_tokenizer_matches_model(merged_tok, base)
    with pytest.raises(ValueError, match="resize first"):
        initialize_new_rows(copy.deepcopy(base), base_tok, merged_tok, EmbeddingConfig(method="eeve"))


def test_procrustes_recovers_a_known_rotation():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(200, 12))
    rotation, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert np.allclose(procrustes(source, source @ rotation), rotation, atol=1e-8)


def test_text_only_gemma3_causal_lm_is_supported(models):
    _, base, _, base_tok, merged_tok = models
    text_model = Gemma3ForCausalLM(base.config.text_config)
    with torch.no_grad():
        text_model.get_input_embeddings().weight.copy_(base.get_input_embeddings().weight)
    text_model.tie_weights()
    reference = text_model.get_input_embeddings().weight.detach()[: len(base_tok)].clone()
    figures = resize_for_tokenizer(text_model, len(merged_tok), 64)
    initialize_new_rows(text_model, base_tok, merged_tok, EmbeddingConfig(method="eeve"))
    assert figures["was_tied"] == 1 and is_untied(text_model)
    assert torch.equal(text_model.get_input_embeddings().weight[: len(base_tok)], reference)
    assert torch.equal(text_model.get_output_embeddings().weight[: len(base_tok)], reference)
