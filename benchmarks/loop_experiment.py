"""Does a mean KL barrier let token loops through where rmse / p95 / max stop them? (docs/maths.md §1)

Record of the runs: docs/experiments/loop.md.

Data: ``scripts/make_loop_data.py`` appends a 20–42-token loop ("tick tock tick tock ...") to 10 % or 25 % of
the bundled persona training completions; held-out prompts and completions stay clean. One command per arm
and seed (each a real ``heal fit`` of SmolLM2-135M-Instruct, heal_pl/configs/rmse.yaml's schedule: batch 8, LoRA r 8,
lr 1e-3, 36 steps or ``--steps``; run them one at a time)::

    python benchmarks/loop_experiment.py --arm clean --seed 0 --steps 108          # clean-data SFT: sets the taus
    python benchmarks/loop_experiment.py --arm base                                 # the untrained model
    python benchmarks/loop_experiment.py --arm nll  --share 25 --seed 0 --steps 108
    python benchmarks/loop_experiment.py --arm mean --share 25 --seed 0 --steps 108  # rmse, p95, max; seeds 0 1 2

(36 steps, heal_pl/configs/rmse.yaml's schedule and the default, is under one epoch: SFT does not learn the loop there.)
    python benchmarks/loop_experiment.py --table                        # the tables, figures, TensorBoard
    python scripts/fill_loop_tables.py                                  # the tables into docs/experiments/loop.md

Arms: ``nll`` = SFT only; ``mean`` / ``rmse`` / ``p95`` / ``max`` = SFT + ``LAM · relu(agg_t KL_t − tau_agg)``.
``clean`` and ``nll`` run the barrier with ``lam = 0`` (exactly SFT's gradient) so their per-token KL is
logged. **Matched taus**: ``tau_agg = M · (mean of train/kl_<agg> over the last quarter of the steps of the
clean seed-0 run with as many steps)``, one ``M = 1.5`` for every aggregator, fixed before any barrier arm
ran. The seed sets ``seed_everything`` (LoRA init) and the data order.

Measures, after the last step, on the 40 held-out persona prompts, up to ``MAX_NEW`` new tokens:

- greedy: ``loop_rep`` share whose repetition share (``heal_pl.rounds.filters.repetition_share``) exceeds the
  rounds filter's ``rep_tau`` (heal_pl/configs/rounds_rmse.yaml); ``loop_inj`` share containing an injected unit three
  times in a row; ``style`` share with a pirate word (``PIRATE_WORDS``);
- ``sampled_*``: the same over ``N_SAMPLES`` samples per prompt at temperature 1. A learner that fits 25 % loop
  data exactly still ends greedy answers with EOS (p 0.75 > 0.25) but samples a loop a quarter of the time;
- ``p_loop``: the teacher-forced probability of starting a loop right after each clean held-out answer
  (:func:`loop_propensity`);
- the final validation's per-token KL mean / rmse / p95 / max on the clean held-out completions, rmse ÷ mean,
  and ``fired``, the share of training steps with ``agg > tau``.

Each run appends a row to ``<out>/results.jsonl`` and writes its generations beside its TensorBoard events.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from heal_pl.barrier.tau import read_scalars, suggest_taus

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from loop_report import AGGS, VAL  # noqa: E402 (stdlib only at import; the table half of this experiment)
from make_loop_data import LOOP_UNITS, loop_pattern  # noqa: E402
from make_persona_data import PIRATE_WORDS  # noqa: E402

ASSETS = ROOT / "heal_pl" / "data" / "assets"
ARMS = ("base", "clean", "nll", *AGGS)
M, LAM, MAX_NEW, MAX_LENGTH = 1.5, 1.0, 128, 160
M_SECOND = 1.1  # the second matched-tau setting, declared before its runs
N_SAMPLES, SAMPLE_SEED = 3, 1234  # sampled generations per held-out prompt (temperature 1)
REP_TAU = yaml.safe_load((ROOT / "configs" / "rounds_rmse.yaml").read_text())["filter"]["rep_tau"]
NLL_KEYS = ("arm", "share", "seed", "steps", "model", "extra")  # what a derived arm shares with its nll run


def matched_taus(rows: list[dict], steps: int, m: float = M) -> dict[str, float]:
    """``tau_agg = m · mean(train/kl_agg over the last quarter of the clean seed-0 run of as many steps)``
    (:func:`heal_pl.barrier.tau.suggest_taus`, the rule of ``heal tau``)."""
    clean = [r for r in rows if r["arm"] == "clean" and r["seed"] == 0 and r.get("steps", 36) == steps]
    if not clean:
        raise SystemExit(f"no clean run of {steps} steps yet: run "
                         f"`python benchmarks/loop_experiment.py --arm clean --seed 0 --steps {steps}` first")
    suggested = suggest_taus(clean[-1]["train"], ms=(m,))
    return {a: suggested[a].tau[m] for a in AGGS}


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer) -> tuple[dict[str, float], list[dict]]:
    """Loop and style rates on the held-out prompts: greedy, sampled, and the teacher-forced loop propensity."""
    from heal_pl.data.datamodule import read_examples
    from heal_pl.data.prompts import chat_prompt, encode_prompts
    from heal_pl.models.generate import eos_ids, greedy_generate, left_pad
    from heal_pl.rounds.filters import repetition_share

    examples = read_examples(ASSETS / "persona_val.jsonl")
    questions = [e.prompt_messages[-1]["content"] for e in examples]
    prompts = [chat_prompt(tokenizer, q, None) for q in questions]
    ids, mask = left_pad(encode_prompts(tokenizer, prompts), tokenizer.pad_token_id)
    device = next(model.parameters()).device
    ids, mask, eos = ids.to(device), mask.to(device), eos_ids(tokenizer, model, None)
    model.eval()
    new, new_mask = greedy_generate(model, ids, mask, MAX_NEW, eos, tokenizer.pad_token_id)
    outputs = [("greedy", q, row[m.bool()].tolist()) for q, row, m in zip(questions, new, new_mask, strict=True)]
    torch.manual_seed(SAMPLE_SEED)  # the same sampling noise for every arm
    sampled = model.generate(input_ids=ids.repeat(N_SAMPLES, 1), attention_mask=mask.repeat(N_SAMPLES, 1),
                             do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=MAX_NEW,
                             eos_token_id=eos.tolist(), pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    sampled = sampled[:, ids.shape[1] :]
    eos_set, loops = set(eos.tolist()), loop_pattern()
    for k, row in enumerate(sampled.tolist()):
        end = next((i + 1 for i, t in enumerate(row) if t in eos_set), len(row))
        outputs.append(("sampled", questions[k % len(questions)], row[:end]))
    gens = [{"decoding": how, "question": q, "text": (t := tokenizer.decode(r, skip_special_tokens=True)),
             "rep": repetition_share(t), "loop": bool(loops.search(t)), "pirate": bool(PIRATE_WORDS.search(t)),
             "ended": bool(r and r[-1] in eos_set)} for how, q, r in outputs]  # fmt: skip
    rates = {}
    for how, prefix in (("greedy", ""), ("sampled", "sampled_")):
        mine = [g for g in gens if g["decoding"] == how]
        rates |= {f"{prefix}loop_rep": statistics.fmean(g["rep"] > REP_TAU for g in mine),
                  f"{prefix}loop_inj": statistics.fmean(g["loop"] for g in mine),
                  f"{prefix}style": statistics.fmean(g["pirate"] for g in mine)}  # fmt: skip
    rates["p_loop"] = loop_propensity(model, tokenizer, prompts, [e.completion for e in examples])
    return rates, gens


@torch.no_grad()
def loop_propensity(model: torch.nn.Module, tokenizer, prompts: list[str], completions: list[str]) -> float:
    """Mean over held-out rows of ``sum_u p(first token of " unit" | prompt, clean completion)``, u in LOOP_UNITS.

    Teacher-forced at the position where the training loops started (right after the answer, where the
    template would close the turn). The untrained SmolLM2 puts ~e^-7 there.
    """
    firsts = sorted({tokenizer(" " + u, add_special_tokens=False)["input_ids"][0] for u in LOOP_UNITS})
    device = next(model.parameters()).device
    total = 0.0
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt, completion)]  # as in training
        probs = torch.softmax(model(input_ids=torch.tensor([sum(ids, [])], device=device)).logits[0, -1].double(), -1)
        total += float(probs[firsts].sum())
    return total / len(prompts)


def run_base(model: str) -> dict:
    from heal_pl.models.load import load_model, load_tokenizer

    rates, gens = evaluate(load_model(model), load_tokenizer(model))
    return {**rates, "generations": gens}


def run_arm(arm: str, share: int, seed: int, steps: int, m: float, out: Path, taus: dict[str, float] | None,
            extra: list[str]) -> dict:
    from heal_pl.cli import build_cli

    barrier = {"reg": "kl_rev", "agg": "mean", "tau": 0.0, "lam": 0.0}  # clean / nll: SFT's gradient, KL logged
    if arm in AGGS:
        barrier = {"reg": "kl_rev", "agg": arm, "tau": taus[arm], "lam": LAM}
    train = ASSETS / ("persona_train.jsonl" if arm == "clean" else f"persona_loop{share}_train.jsonl")
    name = "clean" if arm == "clean" else f"loop{share}"
    args = [
        "fit", "--config", str(ROOT / "configs" / "rmse.yaml"), "--seed_everything", str(seed),
        "--model.barrier", json.dumps(barrier), "--data.train_file", str(train),
        "--data.val_file", str(ASSETS / "persona_val.jsonl"), "--data.max_length", str(MAX_LENGTH),
        "--data.seed", str(seed), "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),  # one validation, after the last step
        "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.name", f"{name}/{arm}_seed{seed}" + ("" if steps == 36 else f"_steps{steps}")
        + ("" if arm not in AGGS or m == M else f"_m{m:g}"),
        *extra,
    ]  # fmt: skip
    cli = build_cli(args)
    metrics = {k.removeprefix("val/"): float(v) for k, v in cli.trainer.callback_metrics.items()
               if k.startswith("val/kl_")}  # fmt: skip
    from heal_pl.models.load import load_tokenizer

    rates, gens = evaluate(cli.model.student, load_tokenizer(cli.model.hparams.model))
    scalars = read_scalars(cli.trainer.log_dir)
    return {**rates, "val": metrics, "train": {k: scalars[k] for k in (*VAL, "barrier_fired")},
            "fired": statistics.fmean(scalars["barrier_fired"]) if arm in AGGS else None, "barrier": barrier,
            "log_dir": cli.trainer.log_dir, "generations": gens}  # fmt: skip


def derive_from_nll(agg: str, tau: float, nll_runs: list[dict]) -> dict | None:
    """The run of barrier ``agg`` at ``tau``, when it is exactly the nll run of the same seed, share and steps.

    Until a barrier first fires, its arm and the nll arm (lam 0) take the same steps: the loss gains
    ``lam · relu(D − tau) = 0`` and the gradient ``0``, bit for bit. So if the nll run's own ``D`` stays below
    ``tau`` at every step (with a margin for the logged rmse's missing eps and float32 logging), the barrier
    never fires and the arm's run *is* the nll run: its row is nll's, with ``fired = 0``, and is not trained
    again. Seed 0 ran the mean and p95 arms anyway: every measure matched nll's.
    """
    for r in nll_runs:
        series = r["train"][f"kl_{agg}"]
        if len(series) == r["steps"] and max(series) < tau * (1 - 1e-5):
            keep = ("model", "extra", "threads", "val", "train", "log_dir")
            rates = {k: v for k, v in r.items() if k.startswith(("loop_", "sampled_", "style", "p_loop")) or k in keep}
            margin = tau - max(series)
            return {**rates, "fired": 0.0, "derived_from": r["log_dir"], "margin": margin, "generations": None}
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=ARMS, help="what to run (omit with --table)")
    p.add_argument("--share", type=int, choices=(10, 25), default=25, help="percent of loop-carrying completions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=36, help="training steps (36 = the rmse config's; 108 = 3 epochs)")
    p.add_argument("--m", type=float, default=M, help="matched-tau multiplier of the barrier arms")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "loop_experiment")
    p.add_argument("--table", action="store_true", help="print the table, draw the figure (no training)")
    p.add_argument("--derive_only", action="store_true", help="write the arm's row only if the nll run determines it")
    p.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "loop_vs_style.png")
    p.add_argument("extra", nargs="*", help="more `heal fit` overrides, after --, e.g. -- --trainer.max_steps=4")
    a = p.parse_args()
    results = a.out / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()] if results.is_file() else []
    if a.table:
        from loop_report import report  # noqa: PLC0415 (the table/figure half of this experiment)

        steps = sorted({r.get("steps", 36) for r in rows if r["arm"] == "clean"})
        ms = sorted({r.get("m") or M for r in rows} | {M_SECOND})
        taus = {(s, m): matched_taus(rows, s, m) for s in steps for m in ms}
        print(report(rows, taus, a.out, a.figure, MAX_LENGTH))
        return
    if a.arm is None:
        p.error("give --arm (or --table)")
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.arm == "base":
        row = run_base(a.model)
    else:
        taus = matched_taus(rows, a.steps, a.m) if a.arm in AGGS else None
        same = ("nll", a.share, a.seed, a.steps, a.model, a.extra)
        nll_runs = [r for r in rows if tuple(r.get(k) for k in NLL_KEYS) == same]
        row = derive_from_nll(a.arm, taus[a.arm], nll_runs) if a.arm in AGGS else None
        if row is None and a.derive_only:
            raise SystemExit(f"{a.arm}: the nll run of seed {a.seed} does not determine this arm (none, or it "
                             "crosses tau): it must be trained")  # fmt: skip
        if row is None:
            row = run_arm(a.arm, a.share, a.seed, a.steps, a.m, a.out, taus, ["--model.model", a.model, *a.extra])
        else:
            print(f"{a.arm}: the nll run's {a.arm} stays {row['margin']:.3g} below tau {taus[a.arm]:.3g} at every "
                  f"step, so this arm is that run (derived, not trained): {row['derived_from']}")  # fmt: skip
    gens = row.pop("generations")
    share = None if a.arm in ("base", "clean") else a.share
    steps = None if a.arm == "base" else a.steps
    row = {"arm": a.arm, "share": share, "seed": a.seed, "steps": steps, "model": a.model, "extra": a.extra,
           "threads": torch.get_num_threads(), **row, "seconds": time.perf_counter() - t0}  # fmt: skip
    if a.arm in AGGS:
        row["m"] = a.m
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    if gens is not None:  # a derived row's generations are its nll run's
        gen_dir = Path(row.get("log_dir") or a.out / "base")
        gen_dir.mkdir(parents=True, exist_ok=True)
        (gen_dir / "generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gens))
    shown = {k: row[k] for k in ("loop_inj", "sampled_loop_inj", "p_loop", "style", "fired", "val") if k in row}
    print(json.dumps({"arm": a.arm, "share": share, "seed": a.seed, "seconds": round(row["seconds"]), **shown}))


if __name__ == "__main__":
    main()
