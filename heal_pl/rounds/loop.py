"""The steer → heal loop (docs/maths.md §5). Round r, with the student S_r = original + adapters 0 … r−1, kept as a
stack of frozen peft adapters on the one copy of the base weights (``heal_pl.rounds.stack``):

1. probe S_r: coherence and trait at the **base** stage (``heal_pl.rounds.dilemmas``);
2. fit a steering vector on S_r from the persona pair (pos vs neg system prompt, same questions);
3. sample completions of S_r steered by ``coeff · κ``; ``heal_pl.rounds.dose.search_dose`` picks κ so that a
   ``target_share`` of them pass the filter (``heal_pl.rounds.filters``: tail perplexity under the *original*
   model, i.e. S_r with every adapter off, repetition share, non-empty); probe S_r under that steering: the
   **steered** stage;
4. heal: a fresh LoRA adapter added to the stack, trained alone by :class:`~heal_pl.module.HealModule` and a
   Lightning ``Trainer`` on the kept completions (prompt = the question with no system prompt), with the barrier's
   ``lam`` scaled by ``(1 + r)^lam_round_pow``; the barrier leashes to ``ref``: ``base`` = the original model
   (every adapter off, HealModule's own ref), ``prev`` = S_r (only the fresh adapter off,
   :class:`~heal_pl.rounds.stack.AdaptersView`);
5. probe the healed student: the **healed** stage; greedy answers to the fixed prompts;
6. stack the adapter: S_{r+1} = S_r + ΔW_r, round r's adapter loaded frozen from the folder it was saved to, as a
   resumed run loads it (``heal_pl.rounds.stack.push_adapter``). Stop when coherence(healed) < ``coh_floor``.

A dose search that keeps no completion at all stops the run at that round, with a message; everything
written so far stays (the round's samples included). Files: ``heal_pl.rounds.state``.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from peft import PeftModel
from torch.utils.tensorboard import SummaryWriter
from transformers import PreTrainedModel

from heal_pl.adapters.lora import LoRASpec
from heal_pl.barrier.kl import KLBarrier
from heal_pl.callbacks.progress_log import ProgressLog
from heal_pl.data.datamodule import HealDataModule
from heal_pl.data.prompts import chat_prompt
from heal_pl.hardware import resolve_device, trainer_settings
from heal_pl.module import HealModule
from heal_pl.progress import interactive, progress
from heal_pl.rounds.dilemmas import DilemmaSet, PersonaPair, probe_model
from heal_pl.rounds.dose import DoseAttempt, search_dose
from heal_pl.rounds.filters import filter_samples, tail_perplexity
from heal_pl.rounds.stack import AdaptersView, history, original, push_adapter
from heal_pl.rounds.state import RoundsState, round_dir, write_json, write_jsonl
from heal_pl.steering.hooks import LayerSpec
from heal_pl.steering.vectors import SteeringVector

log = logging.getLogger("heal_pl")


@dataclass(frozen=True)
class Sampling:
    """Steered sampling: ``n_prompts`` questions, one completion each, up to ``max_new_tokens`` tokens,
    temperature / top-p sampling (temperature 0 = greedy), ``batch_size`` prompts per ``generate``."""

    n_prompts: int = 16
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 8


@dataclass(frozen=True)
class Dose:
    """Steering ``coeff · κ``, κ in ``[kappa_min, 1]``, until ``target_share`` of samples pass.

    The search is :func:`heal_pl.rounds.dose.search_dose`.
    """

    coeff: float = 32.0
    kappa_min: float = 0.1
    target_share: float = 0.5
    max_attempts: int = 3


@dataclass(frozen=True)
class Filter:
    """Keep a completion when tail perplexity (top ``tail`` share of token NLLs) < ``ppl_tau`` and
    repetition share < ``rep_tau`` and it is non-empty (``heal_pl.rounds.filters``)."""

    ppl_tau: float = 60.0
    rep_tau: float = 0.5
    tail: float = 0.25


@dataclass(frozen=True)
class Heal:
    """The heal fit per round: optimizer ``steps``, ``lr``, ``warmup_steps``, ``batch_size`` rows of at most
    ``max_length`` tokens, and what the barrier leashes to (``base`` = the original model, ``prev`` = S_r).
    ``accelerator``, ``devices``, ``precision``: the Lightning ``Trainer``'s; ``None`` follows the run's
    ``device`` and ``dtype`` (:func:`heal_pl.hardware.trainer_settings`)."""

    steps: int = 20
    lr: float = 1e-3
    warmup_steps: int = 2
    batch_size: int = 8
    max_length: int = 128
    ref: Literal["base", "prev"] = "base"
    accelerator: str | None = None
    devices: int | list[int] | str | None = None
    precision: str | None = None


@dataclass
class RoundsContext:
    """Everything a round needs that does not change between rounds (the model itself is the student: the
    original model is the student with every adapter off, ``heal_pl.rounds.stack.original``)."""

    model_name: str
    tokenizer: Any
    persona: PersonaPair
    dilemmas: DilemmaSet
    fit_questions: list[str]
    sample_questions: list[str]
    greedy_prompts: list[str]
    method: Literal["mean_diff", "pca"]
    layers: LayerSpec
    sampling: Sampling
    dose: Dose
    filter: Filter
    heal: Heal
    barrier: KLBarrier
    lora: LoRASpec
    coh_floor: float
    seed: int
    state: RoundsState
    writer: SummaryWriter
    progress: bool = True
    device: str = "cpu"
    dtype: str = "float32"


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
    top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
) -> list[str]:
    """Completions of chat-formatted ``prompts`` (left padding, special tokens dropped, stripped); greedy when
    ``temperature == 0``, else sampled from a generator seeded by ``seed`` (the global RNG is restored)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for s in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[s : s + batch_size], add_special_tokens=False, padding=True,
                                padding_side="left", return_tensors="pt").to(model.device)  # fmt: skip
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad, **kwargs)
                out += [t.strip() for t in tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :],
                                                                  skip_special_tokens=True)]  # fmt: skip
    finally:
        model.train(was_training)
    return out


def _log_scalars(ctx: RoundsContext, r: int, metrics: dict[str, Any]) -> None:
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            ctx.writer.add_scalar(f"rounds/{key}", value, r)
    ctx.writer.flush()


def _sample_at(ctx: RoundsContext, student: PreTrainedModel | PeftModel, vector: SteeringVector, r: int, kappa: float,
               attempt: int) -> DoseAttempt:
    prompts = [chat_prompt(ctx.tokenizer, q, None) for q in ctx.sample_questions]
    s = ctx.sampling
    with vector.steering(student, ctx.dose.coeff * kappa):
        texts = generate_texts(student, ctx.tokenizer, prompts, s.max_new_tokens, s.temperature, s.top_p,
                               seed=ctx.seed + 1000 * r + attempt, batch_size=s.batch_size)  # fmt: skip
    with original(student):
        ppl = tail_perplexity(student, ctx.tokenizer, prompts, texts, ctx.filter.tail, s.batch_size)
    scores = filter_samples(texts, ppl, ctx.filter.ppl_tau, ctx.filter.rep_tau)
    kept = sum(x.keep for x in scores)
    ctx.state.event("dose_attempt", round=r, attempt=attempt, kappa=kappa, coeff=ctx.dose.coeff * kappa,
                    kept=kept, total=len(scores))  # fmt: skip
    log.info("round %d: dose κ=%.3g (coeff %.3g) kept %d/%d", r, kappa, ctx.dose.coeff * kappa, kept, len(scores))
    return DoseAttempt(kappa, kept, len(scores), payload=scores)


def _heal(
    ctx: RoundsContext, student: PreTrainedModel | PeftModel, rows: list[dict[str, str]], r: int
) -> tuple[PeftModel, dict[str, float]]:
    """Fit a fresh adapter on ``student`` itself (:meth:`HealModule.around`: added to the stack in place, in its own
    dtype and on its own device, no copy) on ``rows`` and save it to ``round_r/adapter``; returns the healed student
    (the stack with the fresh adapter on, for the healed probes) and the trainer's last logged metrics."""
    rdir = round_dir(ctx.state.out, r)
    write_jsonl(rdir / "train.jsonl", rows)
    h = ctx.heal
    dm = HealDataModule(train_file=str(rdir / "train.jsonl"), val_fraction=0.0, model=ctx.model_name,
                        max_length=h.max_length, batch_size=h.batch_size, seed=ctx.seed + r)  # fmt: skip
    dm.set_tokenizer(ctx.tokenizer)
    L.seed_everything(ctx.seed + r, verbose=False)  # the fresh adapter's random A, then the fit
    module = HealModule.around(student, model=ctx.model_name, lora=ctx.lora, barrier=ctx.barrier, round=r,
                               lr=h.lr, warmup_steps=h.warmup_steps, adapter_dir=str(rdir / "adapter"))  # fmt: skip
    frozen = history(student)
    if h.ref == "prev" and frozen:  # HealModule's own ref is every adapter off: the original model = ref base
        module.set_ref_model(AdaptersView(module.student, frozen))
    trainer = L.Trainer(
        **trainer_settings(ctx.device, ctx.dtype, h.accelerator, h.devices, h.precision), max_steps=h.steps,
        logger=TensorBoardLogger(str(ctx.state.out / "tb"), name=f"round_{r:02d}", version=""),
        enable_checkpointing=False, enable_model_summary=False,
        log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=0,
        enable_progress_bar=ctx.progress and interactive(sys.stdout),  # off a terminal: ProgressLog's lines
        callbacks=[ProgressLog(when="auto" if ctx.progress else "never")],
        default_root_dir=str(rdir), gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    healed = module.student.to(resolve_device(ctx.device)).eval()  # Lightning's teardown moves a GPU module to CPU
    return healed, {k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items()}


def run_round(
    ctx: RoundsContext, student: PreTrainedModel | PeftModel, r: int
) -> tuple[PreTrainedModel | PeftModel, dict[str, Any]]:
    """One round on ``student`` (S_r: the original model, or the stack of rounds 0 … r−1's frozen adapters on it,
    :mod:`heal_pl.rounds.stack`). Returns (S_{r+1}, metrics); ``metrics["stop"]`` says why the run stops."""
    rdir = round_dir(ctx.state.out, r)
    rdir.mkdir(parents=True, exist_ok=True)
    tok, d = ctx.tokenizer, ctx.dilemmas
    base = probe_model(student, tok, d)
    greedy = {"base": generate_texts(student, tok, [chat_prompt(tok, p, None) for p in ctx.greedy_prompts],
                                     ctx.sampling.max_new_tokens)}  # fmt: skip
    pos = [chat_prompt(tok, q, ctx.persona.pos_system) for q in ctx.fit_questions]
    neg = [chat_prompt(tok, q, ctx.persona.neg_system) for q in ctx.fit_questions]
    vector = SteeringVector.fit(student, tok, pos, neg, method=ctx.method, layers=ctx.layers,
                                model_name=ctx.model_name)  # fmt: skip
    vector.save(rdir / "vector.safetensors")
    n = iter(range(ctx.dose.max_attempts))
    dose = search_dose(lambda k: _sample_at(ctx, student, vector, r, k, next(n)), ctx.dose.kappa_min,
                       ctx.dose.target_share, ctx.dose.max_attempts)  # fmt: skip
    rows = [{"round": r, "attempt": i, "chosen": a is dose.chosen, "kappa": a.kappa, "prompt": q, **asdict(x)}
            for i, a in enumerate(dose.attempts) for q, x in zip(ctx.sample_questions, a.payload, strict=True)]
    write_jsonl(rdir / "samples.jsonl", rows)
    coeff = ctx.dose.coeff * dose.chosen.kappa
    with vector.steering(student, coeff):
        steered = probe_model(student, tok, d)
    metrics: dict[str, Any] = {
        "round": r, "kappa": dose.chosen.kappa, "coeff": coeff, "kept": dose.chosen.kept,
        "sampled": dose.chosen.total, "kept_share": dose.chosen.share, "dose_passed": dose.passed,
        "dose_attempts": len(dose.attempts), "coherence_base": base["coherence"], "trait_base": base["trait"],
        "coherence_steered": steered["coherence"], "trait_steered": steered["trait"],
    }  # fmt: skip
    if dose.chosen.kept == 0:
        metrics["stop"] = (f"round {r}: no completion passed the filter after {len(dose.attempts)} dose attempts "
                           f"(κ down to {min(a.kappa for a in dose.attempts):.3g}, ppl_tau={ctx.filter.ppl_tau}, "
                           f"rep_tau={ctx.filter.rep_tau}); nothing to heal on, the run stops here")  # fmt: skip
        write_json(rdir / "greedy.json", greedy)
        return student, metrics
    kept = [{"prompt": q, "completion": x.text} for q, x in zip(ctx.sample_questions, dose.chosen.payload,
                                                                strict=True) if x.keep]  # fmt: skip
    adapted, fit = _heal(ctx, student, kept, r)
    healed = probe_model(adapted, tok, d)
    greedy["healed"] = generate_texts(adapted, tok, [chat_prompt(tok, p, None) for p in ctx.greedy_prompts],
                                      ctx.sampling.max_new_tokens)  # fmt: skip
    write_json(rdir / "greedy.json", greedy)
    metrics |= {"coherence_healed": healed["coherence"], "trait_healed": healed["trait"],
                **{f"fit_{k}": v for k, v in fit.items()}}  # fmt: skip
    # the trained adapter replaced by its saved copy, frozen: from the file, as a resumed run stacks it
    student = push_adapter(adapted, rdir / "adapter", r)
    del adapted
    gc.collect()
    if healed["coherence"] < ctx.coh_floor:
        metrics["stop"] = (f"round {r}: coherence {healed['coherence']:.4f} < coh_floor={ctx.coh_floor}; "
                           "early stop")  # fmt: skip
    write_json(rdir / "metrics.json", metrics)
    return student, metrics


def run_loop(ctx: RoundsContext, student: PreTrainedModel | PeftModel, rounds: int) -> RoundsState:
    """Rounds ``state.next_round … rounds − 1`` (stopping early), persisting after each one."""
    state = ctx.state
    for r in progress(range(state.next_round, rounds), desc="rounds", unit="round", disable=not ctx.progress):
        student, metrics = run_round(ctx, student, r)
        stop = metrics.pop("stop", None)
        _log_scalars(ctx, r, metrics)
        log.info("round %d: κ=%.3g kept %d/%d; coherence %.4f -> steered %.4f -> healed %s; trait %.4f -> %s", r,
                 metrics["kappa"], metrics["kept"], metrics["sampled"], metrics["coherence_base"],
                 metrics["coherence_steered"], metrics.get("coherence_healed", "-"), metrics["trait_base"],
                 metrics.get("trait_healed", "-"))  # fmt: skip
        if "coherence_healed" in metrics:
            state.finished.append(metrics)
            state.event("round", **metrics)
        if stop is not None:
            state.stopped = {"round": r, "reason": stop, "metrics": metrics}
            state.event("stop", round=r, reason=stop)
            log.warning("heal rounds: %s", stop)
        state.save()
        if stop is not None:
            break
    return state
