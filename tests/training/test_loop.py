"""The loop phases 3 and 4 share: one optimizer step weights every predicted token equally."""
from __future__ import annotations

import pytest
import torch

from kormedgemma.data.batching import collate
from kormedgemma.modeling.loss import IGNORE, CausalLMLoss
from kormedgemma.training.loop import make_accelerator, mean_loss, optimizer_step, predicted_tokens

# Losses are recorded rounded to 5 decimals, so two runs within 1e-6 of each other can read 1e-5 apart
# (6.665455 and 6.665454 round to 6.66546 and 6.66545): runs that must agree are compared within two
# rounding units.
ROUNDED = 2e-5


def _model() -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                              sliding_window=64, layer_types=["full_attention"] * 2)
    return Gemma3ForCausalLM(config).float()


def _example(length: int, answer: int, seed: int) -> tuple[list[int], list[int]]:
    ids = torch.randint(3, 64, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return ids, [IGNORE] * (length - answer) + ids[length - answer:]


# Micro-batch one: two short examples with 1–2 answer tokens; two: long ones with 20–30.
SHORT = [_example(6, 1, 1), _example(9, 2, 2)]
LONG = [_example(40, 30, 3), _example(33, 20, 4)]


def _step_update(micro_batches: list[list[tuple[list[int], list[int]]]]) -> tuple[torch.Tensor, float]:
    """Parameter change of one SGD step (lr 1) taken through `optimizer_step`, and its loss."""
    model = _model()
    accelerator = make_accelerator(len(micro_batches), 2, max_grad_norm=1e9)
    parameters = list(model.parameters())
    before = torch.cat([p.detach().flatten().clone() for p in parameters])
    module, optimizer = accelerator.prepare(CausalLMLoss(model, chunk_tokens=16), torch.optim.SGD(parameters, lr=1.0))
    loss, _, tokens = optimizer_step(accelerator, module, optimizer, [collate(b, 0) for b in micro_batches],
                                     parameters, 1e9)
    assert tokens == sum(predicted_tokens(collate(b, 0)) for b in micro_batches) == 53
    return torch.cat([p.detach().flatten() for p in parameters]) - before, loss


def test_loss_weighting_across_accumulation_equals_one_large_batch():
    accumulated, loss = _step_update([SHORT, LONG])
    whole, whole_loss = _step_update([SHORT + LONG])
    torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-7)
    assert loss == pytest.approx(whole_loss, rel=1e-6)
    # the weighting transformers fixed: averaging the two micro-batch means moves the weights elsewhere
    model = _model()
    for batch in (collate(SHORT, 0), collate(LONG, 0)):
        (CausalLMLoss(model)(**batch) / predicted_tokens(batch) / 2).backward()
    mean_of_means = -torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (mean_of_means - whole).norm() > 0.2 * whole.norm()


def test_mean_loss_is_per_predicted_token_over_all_batches():
    model = _model()
    accelerator = make_accelerator(1, 2, 1.0)
    module = accelerator.prepare(CausalLMLoss(model))
    got = mean_loss(module, [collate(SHORT, 0), collate(LONG, 0)], accelerator)
    from kormedgemma.modeling.loss import chunked_causal_lm_loss

    whole = collate(SHORT + LONG, 0)
    with torch.no_grad():
        expected = float(chunked_causal_lm_loss(model, whole["input_ids"], labels=whole["labels"],
                                                attention_mask=whole["attention_mask"]))
    assert got == pytest.approx(expected, abs=ROUNDED)
    assert mean_loss(module, [], accelerator) is None
