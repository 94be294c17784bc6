"""The sweep's forks read a batch at a time on the KL's own cache (heal_pl.survival.batch_forks) against the
reference that shares none of that code: one cache-free forward of prompt ⊕ y_1…y_t ⊕ splice per fork through the
model's own ``logits`` (:func:`probe_forks_recompute`), prompt by prompt, on the same generated tokens."""

from __future__ import annotations

import numpy as np
import pytest

from heal_pl.data.prompts import chat_prompt
from heal_pl.survival.batch_forks import batch_fork_reader
from heal_pl.survival.config import SweepConfig
from heal_pl.survival.forks import probe_forks_recompute
from heal_pl.survival.probes import answer_token_ids
from heal_pl.survival.sweep import measure_alpha
from tests.helpers import lively
from tests.survival.test_forks import SPLICE, random_vector

QUESTIONS = ["Is the sun cold?", "Is water wet, and do fish live in the sea near the river?", "Is 2 + 2 = 4?",
             "Do cows eat grass and hay on the farm every morning in the summer?", "Is the sky blue?"]  # fmt: skip


@pytest.mark.parametrize(("family", "batched"), [("llama", True), ("gemma3", True), ("gemma2", True),
                                                 ("cohere", True), ("qwen3_5", False)])  # fmt: skip
@pytest.mark.parametrize("fork_batch", [64, 7])
def test_the_batch_reads_the_forks_each_prompt_reads_alone(family: str, batched: bool, fork_batch: int,
                                                           tokenizer) -> None:  # fmt: skip
    model = lively(family)
    prompts = [chat_prompt(tokenizer, q, None) for q in QUESTIONS]  # 5 lengths: every row its own left padding
    config = SweepConfig(w=20, fork_step=3, splice=SPLICE, batch_size=3, fork_batch=fork_batch, stop_at_eos=True)
    forks, ids, vec = config.fork_points(), answer_token_ids(tokenizer, config.answer_sets()), random_vector()
    reader = batch_fork_reader(model, tokenizer, prompts, vec, 8.0, config.w, forks, SPLICE, ids, fork_batch)
    assert (reader is not None) is batched  # gemma3: sliding window 8, shorter than prompt + w; qwen3_5: recurrent
    first = measure_alpha(model, tokenizer, vec, prompts, 8.0, config, forks, ids, "+1")
    # a token that ends the rollouts at different steps from now on: rows of several lengths in one batch
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, next(
        t for t in sorted({t for row in first["tokens"] for t in row})
        if len({row.index(t) if t in row else -1 for row in first["tokens"]}) > 2)]
    got = measure_alpha(model, tokenizer, vec, prompts, 8.0, config, forks, ids, "+1")
    assert len(got["pmass"]) == len(prompts) and len(set(got["gen_len"])) > 1, "varied lengths, some EOS"
    for i, prompt in enumerate(prompts):
        ref = probe_forks_recompute(model, tokenizer, prompt, got["tokens"][i], vec, 8.0, config.w, forks, SPLICE, ids)
        pmass, p_true = np.asarray(got["pmass"][i]), np.asarray(got["p_true"][i])
        np.testing.assert_array_equal(np.isnan(pmass), np.isnan(ref.pmass))  # the forks past the end: NaN
        np.testing.assert_allclose(pmass, ref.pmass, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(p_true, ref.p_true, rtol=0, atol=1e-5)
        assert got["gen_len"][i] == ref.gen_len
    reached = np.concatenate([np.asarray(p)[~np.isnan(p)] for p in got["pmass"]])
    assert np.ptp(reached) > 1e-3 * reached.max(), "the forks differ far more than the tolerance"
