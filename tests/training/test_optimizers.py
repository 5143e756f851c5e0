"""Whole bf16 matrices keep their updates: the stage optimizer follows the fp32 trajectory."""
from __future__ import annotations

import torch

from kormedgemma.training.loop import make_optimizer

ROWS, DIM, STEPS = 2000, 256, 100


def _trajectory(kind: str, dtype: torch.dtype, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """100 AdamW steps on 0.03-sized rows pulled toward a target through noisy gradients (the
    same gradients for every run); returns the start and the end, in fp32."""
    start = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0)) * 0.03
    target = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1)) * 0.03
    weight = torch.nn.Parameter(start.clone().to(dtype))
    optimizer = make_optimizer(kind, [weight], lr, weight_decay=0.0)
    noise = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        weight.grad = ((weight.detach().float() - target) + 0.01 * torch.randn(ROWS, DIM, generator=noise)).to(dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return start, weight.detach().float()


def _against_fp32(kind: str, lr: float) -> tuple[float, float]:
    start, reference = _trajectory("adamw", torch.float32, lr)
    _, trained = _trajectory(kind, torch.bfloat16, lr)
    moved, expected = (trained - start).flatten(), (reference - start).flatten()
    cosine = float(torch.nn.functional.cosine_similarity(moved, expected, dim=0))
    return cosine, float(moved.norm() / expected.norm())


def test_kahan_adamw_on_bf16_follows_the_fp32_trajectory():
    for lr in (2e-5, 5e-5):  # stage 7's and stages 4-5's learning rates
        cosine, ratio = _against_fp32("adamw_kahan", lr)
        assert cosine >= 0.99 and abs(ratio - 1) < 0.02, (lr, cosine, ratio)


def test_8bit_adamw_with_stochastic_rounding_follows_fp32_at_stage6_rate():
    """Stage 6's optimizer (both matrices, where Kahan does not fit in 24 GB): torchao's 8-bit
    AdamW with bf16 stochastic rounding keeps its updates in expectation at lr 1e-4."""
    cosine, ratio = _against_fp32("adamw_8bit_sr", 1e-4)
    assert cosine >= 0.99 and abs(ratio - 1) < 0.03, (cosine, ratio)


def test_plain_adamw_on_bf16_loses_most_small_updates():
    """Why the default is Kahan: the same run with torch AdamW on bf16 weights drifts off."""
    cosine, ratio = _against_fp32("adamw", 2e-5)
    assert cosine < 0.8 and ratio < 0.7, (cosine, ratio)


def test_kahan_adamw_equals_torch_adamw_on_fp32_weights():
    """On fp32 tensors (new-row deltas, LoRA) the two kinds take the same steps."""
    start, torch_run = _trajectory("adamw", torch.float32, 1e-3)
    _, optimi_run = _trajectory("adamw_kahan", torch.float32, 1e-3)
    torch.testing.assert_close(optimi_run, torch_run, rtol=0, atol=1e-6)
    assert float((torch_run - start).abs().max()) > 0.01  # and they did move


def test_stage_optimizer_kinds_map_to_their_implementations(monkeypatch):
    """`adamw_kahan` and `adamw` never go to bitsandbytes, even where it is ready (a CUDA box)."""
    from dataclasses import replace

    import optimi

    from config.training_config import StageConfig
    from kormedgemma.training import stage as training

    asked = []
    monkeypatch.setattr(training, "bitsandbytes_ready", lambda what, instead, notices: asked.append(what) or False)
    weight = [torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))]
    assert isinstance(training._optimizer(StageConfig(), weight, []), optimi.AdamW)  # the default
    assert type(training._optimizer(replace(StageConfig(), optimizer="adamw"), weight, [])) is torch.optim.AdamW
    assert asked == []
    fallback = training._optimizer(replace(StageConfig(), optimizer="adamw_8bit"), weight, [])
    assert asked == ["optimizer adamw_8bit"] and isinstance(fallback, optimi.AdamW)
    from torchao.optim import AdamW8bit

    rounded = training._optimizer(replace(StageConfig(), optimizer="adamw_8bit_sr"), weight, [])
    assert isinstance(rounded, AdamW8bit) and rounded.bf16_stochastic_round
