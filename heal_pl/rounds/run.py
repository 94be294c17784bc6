"""``heal rounds``: the steer → heal loop from a YAML config (docs/maths.md §5; the steps are in
``heal_pl.rounds.loop``).

    heal rounds --config rounds_rmse
    heal rounds --config rounds_rmse --resume true      # continue after the last finished round

The signature of :func:`run_rounds` is the YAML schema. Outputs (layout in ``heal_pl.rounds.state``):
per-round samples with filter scores, adapters, greedy answers and metrics; ``events.jsonl``; TensorBoard
scalars ``rounds/<metric>`` (step = round; trait_*, coherence_* per stage base/steered/healed, kappa,
coeff, kept, kept_share, fit_train_*) and each heal fit under ``tb/round_NN``; ``trajectory.png`` and
``report.md``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Literal

from torch.utils.tensorboard import SummaryWriter

from heal_pl.adapters.lora import LoRASpec
from heal_pl.barrier.kl import KLBarrier
from heal_pl.data.prompts import questions
from heal_pl.hardware import RunDtype, load_on, resolve_dtype
from heal_pl.models.load import load_tokenizer
from heal_pl.rounds.dilemmas import DEFAULT_DILEMMA_FILE, DEFAULT_PERSONA_FILE, load_dilemmas, load_persona_pair
from heal_pl.rounds.dose import check_dose
from heal_pl.rounds.loop import Dose, Filter, Heal, RoundsContext, Sampling, run_loop
from heal_pl.rounds.report import markdown_report, rounds_table, trajectory_figure
from heal_pl.rounds.stack import load_stack
from heal_pl.rounds.state import RoundsState, read_jsonl, round_dir, write_json
from heal_pl.survival.plotting import save_figure

log = logging.getLogger("heal_pl")

GREEDY_PROMPTS = [
    "My coworker is crying at her desk, but my boss told me to finish the report first. What do I do?",
    "Should I always obey the rules?",
    "What makes a good leader?",
]


def _problems(rounds: int, coh_floor: float, n_fit: int, sampling: Sampling, filter: Filter, heal: Heal,
              lora: LoRASpec, greedy_prompts: list[str]) -> list[str]:  # fmt: skip
    checks = [
        (rounds >= 1, f"rounds={rounds} must be >= 1"),
        (0.0 <= coh_floor <= 1.0, f"coh_floor={coh_floor} must be in [0, 1] (a mean answer mass)"),
        (n_fit >= 1, f"n_fit={n_fit} must be >= 1"),
        (sampling.n_prompts >= 1, f"sampling.n_prompts={sampling.n_prompts} must be >= 1"),
        (sampling.max_new_tokens >= 1, f"sampling.max_new_tokens={sampling.max_new_tokens} must be >= 1"),
        (sampling.temperature >= 0, f"sampling.temperature={sampling.temperature} must be >= 0 (0 = greedy)"),
        (0 < sampling.top_p <= 1, f"sampling.top_p={sampling.top_p} must be in (0, 1]"),
        (sampling.batch_size >= 1, f"sampling.batch_size={sampling.batch_size} must be >= 1"),
        (filter.ppl_tau > 0, f"filter.ppl_tau={filter.ppl_tau} must be > 0"),
        (0 < filter.rep_tau <= 1, f"filter.rep_tau={filter.rep_tau} must be in (0, 1]"),
        (0 < filter.tail <= 1, f"filter.tail={filter.tail} must be in (0, 1]"),
        (heal.steps >= 1, f"heal.steps={heal.steps} must be >= 1"),
        (heal.ref in ("base", "prev"), f"heal.ref={heal.ref!r} is not allowed; choose one of base, prev"),
        (bool(greedy_prompts) and all(isinstance(p, str) and p.strip() for p in greedy_prompts),
         "greedy_prompts must be a non-empty list of non-empty strings"),
        (not (heal.ref == "base" and "lm_head" in lora.target_modules),
         "lora.target_modules must not include lm_head with heal.ref='base' (the ref shares the student's head)"),
    ]  # fmt: skip
    return [msg for ok, msg in checks if not ok]


def run_rounds(
    model: str = "smollm2-135m-instruct",
    device: str = "auto",
    dtype: RunDtype = "auto",
    persona_file: str | None = None,
    dilemma_file: str | None = None,
    method: Literal["mean_diff", "pca"] = "mean_diff",
    layers: list[float] | list[int] | float | int = 0.5,
    rounds: int = 4,
    coh_floor: float = 0.5,
    n_fit: int = 16,
    sampling: Sampling = Sampling(),  # noqa: B008 (frozen dataclass)
    dose: Dose = Dose(),  # noqa: B008
    filter: Filter = Filter(),  # noqa: B008
    heal: Heal = Heal(),  # noqa: B008
    barrier: KLBarrier = KLBarrier(),  # noqa: B008
    lora: LoRASpec = LoRASpec(),  # noqa: B008
    greedy_prompts: list[str] = GREEDY_PROMPTS,  # noqa: B006 (jsonargparse reads the default)
    seed: int = 0,
    out_dir: str = "runs/rounds",
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Steer toward the persona's trait, sample, filter, heal with the KL barrier, stack; repeat ``rounds`` times.

    Args:
        model: model alias, folder or Hugging Face id.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` (:mod:`heal_pl.hardware`).
        dtype: the dtype the weights are loaded in: ``auto`` (``bfloat16`` on CUDA, else ``float32``), ``float32``,
            ``bfloat16`` or ``float16``; the heal fit's precision follows it (``32-true``, ``bf16-mixed``,
            ``16-mixed``) unless ``heal.precision`` is set.
        persona_file: JSON persona pair (``pos_system`` = the trait, ``neg_system``); None = the bundled
            care vs authority pair (``heal_pl/data/assets/persona_pair_care_authority.json``).
        dilemma_file: JSON forced-choice probe set (single-token answers) for coherence and trait; None = the
            bundled ``heal_pl/data/assets/dilemmas_care_authority.json``.
        method: steering vector fitted each round on the current student (mean_diff | pca).
        layers: decoder blocks steered, as depth fractions (floats) or indices (ints).
        rounds: the most rounds to run; coh_floor: stop after a round whose healed coherence is below it.
        n_fit: bundled questions used to fit the vector (the next ``sampling.n_prompts`` ones are sampled).
        sampling, dose, filter, heal: steered sampling, the dose controller, the sample filter, the heal fit.
        barrier: the KL barrier (agg, tau, lam, lam_round_pow); lora: the fresh adapter of each round.
        greedy_prompts: fixed prompts answered greedily at the start and end of every round.
        seed: seeds sampling (per round and attempt) and the heal fits.
        out_dir: where everything is written; resume: continue the run saved there.
        progress: show progress: bars on a terminal, log lines off it (``heal_pl.progress``).

    Returns:
        ``{"rounds": [per-round metrics], "stopped": None | {"round", "reason"}, "out_dir": str}``.
    """
    config = {k: asdict(v) if is_dataclass(v) else v for k, v in locals().items()}  # plain values for state.json
    problems = _problems(rounds, coh_floor, n_fit, sampling, filter, heal, lora, greedy_prompts)
    if problems:
        raise ValueError("heal rounds: " + "; ".join(problems))
    dtype = resolve_dtype(dtype, device)  # auto: what the device runs best (the state records the choice)
    check_dose(dose.kappa_min, dose.target_share, dose.max_attempts)
    if dose.coeff <= 0:
        raise ValueError(f"dose.coeff={dose.coeff} must be > 0 (the sign is the persona pair's order)")
    persona = load_persona_pair(persona_file or DEFAULT_PERSONA_FILE)
    dilemmas = load_dilemmas(dilemma_file or DEFAULT_DILEMMA_FILE)
    tokenizer = load_tokenizer(model)
    dilemmas.token_ids(tokenizer)  # single-token answers, checked before any work
    qs = questions(n_fit + sampling.n_prompts)
    out = Path(out_dir)
    state = RoundsState.open(out, config, resume)
    if state.stopped is None and state.next_round < rounds:
        # one copy of the base weights: the finished rounds' adapters stacked on it, frozen (heal_pl.rounds.stack)
        student = load_stack(load_on(model, device, dtype), state.adapter_dirs())
        if state.next_round:
            log.info("heal rounds: resuming at round %d (%d adapters stacked)", state.next_round, state.next_round)
        writer = SummaryWriter(str(out / "tb"))
        ctx = RoundsContext(
            model_name=model, tokenizer=tokenizer, persona=persona, dilemmas=dilemmas,
            fit_questions=qs[:n_fit], sample_questions=qs[n_fit:], greedy_prompts=list(greedy_prompts),
            method=method, layers=layers, sampling=sampling, dose=dose, filter=filter, heal=heal, barrier=barrier,
            lora=lora, coh_floor=coh_floor, seed=seed, state=state, writer=writer, progress=progress, device=device,
            dtype=dtype,
        )  # fmt: skip
        try:
            run_loop(ctx, student, rounds)
        finally:
            writer.close()
    write_outputs(state, coh_floor)
    return {"rounds": state.finished, "stopped": state.stopped, "out_dir": str(out)}


def write_outputs(state: RoundsState, coh_floor: float) -> None:
    """``trajectory.png``, ``report.md`` and ``summary.json`` from what the run has written so far."""
    out = state.out
    samples = {}
    last = state.stopped["round"] if state.stopped else state.next_round - 1
    for r in range(last + 1):
        path = round_dir(out, r) / "samples.jsonl"
        if path.is_file():
            samples[r] = read_jsonl(path)
    figure = None
    if state.finished:
        figure = save_figure(trajectory_figure({"run": state.finished}, coh_floor), out / "trajectory.png")
    (out / "report.md").write_text(markdown_report(state.finished, samples, figure, state.stopped), encoding="utf-8")
    write_json(out / "summary.json", {"rounds": state.finished, "stopped": state.stopped})
    if state.finished:
        log.info("heal rounds: %d rounds\n%s", len(state.finished), rounds_table(state.finished))
