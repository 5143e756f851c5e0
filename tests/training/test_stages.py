"""Phase 3 building blocks: each EEVE stage trains exactly its set, row by row."""
import copy

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from config.training_config import LoraConfig
from kormedgemma.core.artifacts import artifact_path
from kormedgemma.modeling.rows import RowDeltaEmbedding, RowDeltaLinear, merge_row_deltas
from kormedgemma.training.stages import STAGES, apply_stage, lora_target_modules, trainable_parameters

LORA = LoraConfig(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def initialized(tiny_phase2):
    config, _, _ = tiny_phase2
    folder = artifact_path(config, "initialized_model")
    base_tok = AutoTokenizer.from_pretrained(artifact_path(config, "base_model"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    batch = tokenizer(["고혈압 환자는 혈압을 매일 잰다.", "Hypertension needs daily checks."], return_tensors="pt",
                      padding=True)
    return model, len(base_tok), len(tokenizer) - len(base_tok), batch


def _train(model, batch, steps=6, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _merged_weights(model):
    inner = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merge_row_deltas(inner)
    return {name: p.detach().clone() for name, p in inner.named_parameters()}, inner


def _changed_rows(before, after):
    return set(torch.nonzero((before != after).any(dim=1)).flatten().tolist())


@pytest.mark.parametrize("number", range(1, 8))
def test_each_stage_changes_exactly_its_parameters(initialized, number):
    model, first, count, batch = initialized
    spec = STAGES[number]
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    trained = apply_stage(copy.deepcopy(model), spec, first, count, LORA)
    losses = _train(trained, batch)
    assert losses[-1] < losses[0], f"stage {number}: loss did not fall ({losses})"
    weights, _ = _merged_weights(trained)
    new_rows = set(range(first, first + count))
    embed = "model.language_model.embed_tokens.weight"
    head = "lm_head.weight"
    expected_rows = {None: set(), "new": new_rows, "all": None}
    for name, expected in ((embed, expected_rows[spec.input_rows]), (head, expected_rows[spec.output_rows])):
        changed = _changed_rows(original[name], weights[name])
        if expected is None:  # all rows trainable: the rows in the batch and beyond move
            assert changed and not changed <= new_rows
        else:
            assert changed <= expected and (changed or not expected)
    for name, value in original.items():
        if name in (embed, head):
            continue
        moved = not torch.equal(value, weights[name])
        if _never_trained(name):
            assert not moved, f"stage {number} moved {name}"
        elif "language_model.layers" in name and name.endswith(tuple(f"{m}.weight" for m in LORA.target_modules)):
            assert moved == spec.lora, f"stage {number}: {name} moved={moved}"
        else:
            assert not moved, f"stage {number} moved {name}"


def _never_trained(name):
    return "vision_tower" in name or "multi_modal_projector" in name


def test_new_row_stages_keep_optimizer_state_small(initialized):
    model, first, count, _ = initialized
    for number in (1, 2, 3):
        trained = apply_stage(copy.deepcopy(model), STAGES[number], first, count)
        sizes = trainable_parameters(trained)
        assert sum(sizes.values()) == count * model.config.text_config.hidden_size * (2 if number == 3 else 1)


def test_row_delta_forward_equals_the_merged_model(initialized):
    model, first, count, batch = initialized
    trained = apply_stage(copy.deepcopy(model), STAGES[3], first, count)
    _train(trained, batch, steps=3)
    assert isinstance(trained.get_input_embeddings(), RowDeltaEmbedding)
    assert isinstance(trained.get_output_embeddings(), RowDeltaLinear)
    with torch.no_grad():
        with_deltas = trained(**batch).logits
    merge_row_deltas(trained)
    with torch.no_grad():
        merged = trained(**batch).logits
    assert torch.allclose(with_deltas, merged, atol=1e-5)


def test_row_delta_gradients_match_full_matrix_gradients(initialized):
    """The custom lm_head backward equals autograd through a full trainable matrix, on the new rows."""
    model, first, count, batch = initialized
    reference = copy.deepcopy(model)
    for p in reference.parameters():
        p.requires_grad_(False)
    reference.lm_head.weight.requires_grad_(True)
    reference(**batch, labels=batch["input_ids"]).loss.backward()
    delta_model = apply_stage(copy.deepcopy(model), STAGES[2], first, count)
    delta_model(**batch, labels=batch["input_ids"]).loss.backward()
    assert torch.allclose(delta_model.lm_head.delta.grad, reference.lm_head.weight.grad[first:first + count], atol=1e-6)


def test_lora_never_targets_the_vision_tower(initialized):
    model, _, _, _ = initialized
    names = lora_target_modules(model, LORA)
    assert names and all("language_model" in n and "vision" not in n for n in names)
    assert len(names) == model.config.text_config.num_hidden_layers * len(LORA.target_modules)


def test_a_tied_model_is_refused(tiny_phase0):
    config, _ = tiny_phase0
    tied = AutoModelForImageTextToText.from_pretrained(artifact_path(config, "base_model"))
    with pytest.raises(ValueError, match="share one tensor: run phase 2"):
        apply_stage(tied, STAGES[4], 1025, 10)


@pytest.mark.parametrize("number", [1, 2, 4, 6])
def test_chunked_loss_and_gradients_equal_the_models_own(initialized, number):
    from kormedgemma.modeling.loss import chunked_causal_lm_loss

    model, first, count, batch = initialized
    reference = apply_stage(copy.deepcopy(model), STAGES[number], first, count, LORA)
    chunked = copy.deepcopy(reference)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    expected = reference(**batch, labels=labels).loss
    expected.backward()
    got = chunked_causal_lm_loss(chunked, batch["input_ids"], labels, batch["attention_mask"], chunk_tokens=5)
    got.backward()
    assert torch.allclose(got, expected, atol=1e-5)
    for (name, p), (_, q) in zip(reference.named_parameters(), chunked.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), name
