"""Greedy decoding with a shrinking batch: same tokens as `generate`, the harness's truncation rule."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kormedgemma.evaluation.decoding import MaskRowsPast, _Stops, context_limit, fit_context, greedy_generate, stop_token_ids

PROMPTS = ["고혈압의 치료는", "당뇨병 환자에게 메트포르민을 처방할 때 확인할 검사는 무엇인가?\n정답：", "폐렴", "A. 이뇨제\nB."]


@pytest.fixture(scope="module")
def merged(tiny_phase3):
    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.modeling.base_model import load_for_eval

    config, _ = tiny_phase3
    return load_for_eval(artifact_path(config, "merged_model"))


def _hf_generate(model, tokenizer, prompt: str, max_new_tokens: int, ids=None) -> str:
    """What lm-evaluation-harness runs: `model.generate`, one prompt, greedy."""
    from transformers import LogitsProcessorList

    ids = ids if ids is not None else tokenizer.encode(prompt)
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_token_ids(tokenizer),
                         pad_token_id=tokenizer.pad_token_id,
                         logits_processor=LogitsProcessorList([MaskRowsPast(len(tokenizer))]))
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_shrinking_batches_give_the_tokens_generate_gives_one_prompt_at_a_time(merged):
    model, tokenizer = merged
    expected = [_hf_generate(model, tokenizer, p, 12) for p in PROMPTS]
    for batch_size in (1, 3, 8):
        run = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=batch_size, progress=False)
        assert run.texts == expected
        assert run.truncated == []


def _early_stop(tokenizer, outputs: list[list[int]]) -> tuple[int, int, str]:
    """(step, row, text) of the earliest ordinary piece any row writes: a stop string that some
    rows produce early and others late or never."""
    return min((k, row, tokenizer.decode([t], skip_special_tokens=True))
               for row, tokens in enumerate(outputs) for k, t in enumerate(tokens)
               if not tokenizer.convert_ids_to_tokens(t).startswith("<0x")
               and tokenizer.decode([t], skip_special_tokens=True).strip())


def test_a_row_leaves_the_batch_the_step_its_text_holds_a_stop_string(merged):
    model, tokenizer = merged
    free = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=24, batch_size=4, progress=False)
    first, row0, stop = _early_stop(tokenizer, free.tokens)
    widths: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: widths.append(out.shape[0]))
    try:
        run = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=24, stop_strings=[stop], batch_size=4,
                              progress=False)
    finally:
        hook.remove()
    for tokens, full in zip(run.tokens, free.tokens):
        holds = [stop in tokenizer.decode(full[:k], skip_special_tokens=True) for k in range(1, len(full) + 1)]
        expected = holds.index(True) + 1 if True in holds else len(full)
        assert tokens == full[:expected]  # the same greedy tokens, up to the first step whose text holds the stop
    lengths = [len(t) for t in run.tokens]
    assert lengths[row0] <= first + 1 and min(lengths) < max(lengths)
    # the prefill sees 4 rows; decoding step k only the rows that have not finished by token k
    assert widths == [4] + [sum(n > k for n in lengths) for k in range(1, max(lengths))]


def test_stop_strings_are_found_across_token_boundaries_and_byte_runs():
    pieces = {1: "<eos>", 5: "abc\n", 6: "\n", 7: "Q", 8: ":", 9: "x"}

    def decode(ids, skip_special_tokens=True):
        # byte fallback as tokenizers decodes it: 0xEA 0xB0 0x80 is 가, a run that is not UTF-8 is all U+FFFD
        out, run = "", []
        for i in list(ids) + [None]:
            if i is not None and i >= 100:
                run.append(i - 100)
                continue
            if run:
                try:
                    out += bytes(run).decode("utf-8")
                except UnicodeDecodeError:
                    out += "\ufffd" * len(run)
                run = []
            if i is not None and not (skip_special_tokens and i == 1):
                out += pieces[i]
        return out

    class Tokenizer:
        def __len__(self):
            return 356

        def batch_decode(self, batch, skip_special_tokens=True):
            return [decode(ids, skip_special_tokens) if ids[0] in pieces or ids[0] >= 100 else "" for ids in batch]

    tokenizer = Tokenizer()
    tokenizer.decode = decode
    stops = _Stops(tokenizer, ["\n\n", "Q:", "가"], eos_ids=[1])
    assert stops.hit([9, 5, 6]) and stops.hit([9, 7, 8]) and stops.hit([9, 1])
    assert not stops.hit([5, 9, 6]) and not stops.hit([7, 9, 8])
    assert stops.hit([9, 0xEA + 100, 0xB0 + 100, 0x80 + 100])
    # the last three bytes alone would read 가; the whole run is not UTF-8, so the text holds no stop
    assert not stops.hit([9, 0xEA + 100, 0xEA + 100, 0xB0 + 100, 0x80 + 100])
    # a byte that completes a character reveals an earlier ASCII byte of its run: checked, never skipped
    dot = _Stops(tokenizer, ["."], eos_ids=[1])
    assert not dot.hit([9, 0x2E + 100, 0xEA + 100]) and dot.hit([9, 0x2E + 100, 0xEA + 100, 0xB0 + 100, 0x80 + 100])
    # a piece holding no stop string's last character is never decoded (x, Q cannot end "Q:" or "\n\n")
    assert stops.may_complete[[9, 7]].tolist() == [False, False] and stops.may_complete[[6, 8, 5]].all()


def test_too_long_prompts_keep_their_last_tokens_as_the_harness_does(merged):
    model, tokenizer = merged
    assert fit_context(list(range(10)), max_length=12, max_new_tokens=4) == (list(range(2, 10)), True)
    assert fit_context(list(range(8)), max_length=12, max_new_tokens=4) == (list(range(8)), False)
    with pytest.raises(ValueError, match="no room for a prompt"):
        fit_context([1, 2], max_length=8, max_new_tokens=8)
    long = PROMPTS[1] * 3
    ids = tokenizer.encode(long)
    limit = len(ids) - 5 + 6  # room for len(ids) - 5 prompt tokens after 6 new ones
    run = greedy_generate(model, tokenizer, [PROMPTS[0], long], max_new_tokens=6, max_length=limit, progress=False)
    assert run.truncated == [1]
    assert run.texts[1] == _hf_generate(model, tokenizer, "", 6, ids=ids[5:])  # <bos> is cut with the rest
    assert run.texts[0] == _hf_generate(model, tokenizer, PROMPTS[0], 6)


def test_context_limit_is_resolved_as_the_harness_resolves_it():
    nested = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=131072),
                                                    max_position_embeddings=1200))
    assert context_limit(nested, SimpleNamespace(model_max_length=512)) == 131072
    plain = SimpleNamespace(config=SimpleNamespace(n_positions=1024, text_config=None))
    assert context_limit(plain, None) == 1024
    bare = SimpleNamespace(config=SimpleNamespace(text_config=None))
    assert context_limit(bare, SimpleNamespace(model_max_length=4096)) == 4096
    assert context_limit(bare, SimpleNamespace(model_max_length=1000000000000000019884624838656)) == 2048


def test_rows_past_the_tokenizer_are_never_generated():
    scores = torch.zeros(2, 10)
    scores[:, 8] = 5.0
    masked = MaskRowsPast(7)(torch.zeros(2, 3, dtype=torch.long), scores)
    assert masked.argmax(-1).tolist() == [0, 0] and torch.isinf(masked[:, 7:]).all()


def test_waiting_prompts_join_the_batch_as_rows_finish_and_change_no_token(merged):
    model, tokenizer = merged
    prompts = PROMPTS + ["간경화 환자의 복수 치료는", "B", "소아 발열의 흔한 원인은 무엇인가", "정답："]
    alone = greedy_generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=1, progress=False)
    _, _, stop = _early_stop(tokenizer, alone.tokens)
    alone = greedy_generate(model, tokenizer, prompts, max_new_tokens=10, stop_strings=[stop], batch_size=1,
                            progress=False)
    shapes: list[tuple[int, int]] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape[:2])))
    try:
        shared = greedy_generate(model, tokenizer, prompts, max_new_tokens=10, stop_strings=[stop], batch_size=3,
                                 progress=False)
    finally:
        hook.remove()
    assert shared.tokens == alone.tokens and shared.texts == alone.texts
    assert min(len(t) for t in alone.tokens) < 10  # some rows stop early, so places free up
    prefills = [k for k, (_, width) in enumerate(shapes) if width > 1]
    steps = [rows for rows, width in shapes if width == 1]
    assert max(rows for rows, _ in shapes) <= 3 and sum(shapes[k][0] for k in prefills) == len(prompts)
    assert any(k > prefills[0] + 1 for k in prefills[1:])  # prompts were admitted between decoding steps
    assert sum(steps) == sum(len(t) - 1 for t in shared.tokens)  # every row in every step was still unfinished
