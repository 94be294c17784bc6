"""The GPU check behind ``benchmarks/gpu_check.sh``: every command of heal_pl on one CUDA device, one table.

    bash benchmarks/gpu_check.sh                         # on a machine with a CUDA GPU (under 8 minutes on one H200)
    python benchmarks/gpu_check.py --dry-run             # the same steps on the CPU, tiny sizes, no 16-mixed / FSDP

Checks, in order (each in its own process, with a time limit, so one failure does not hide the others):

1. ``fit bf16-mixed`` and ``fit 16-mixed``: ``heal fit`` of ``heal_pl/configs/route.yaml`` (routed adapter, routing arm
   ``route``) on the GPU. A probe callback placed BEFORE ``RouteAblateEvalCallback`` sees, in the same
   ``on_before_optimizer_step``, exactly the gradients ``route_gradients`` sees; under 16-mixed it asserts that
   the GradScaler has already unscaled them (its optimizer state is ``UNSCALED``) and that their norm is within 8×
   of the bf16-mixed run's (scaled gradients would be ``scale`` ≥ 256× larger).
2. ``forks cuda``: fork reads on the rollout cache == the recompute (1e-4) on CUDA in float32 for a tiny Gemma-3
   (sliding window 8) and a tiny Qwen3.5 (linear/full hybrid); bf16 difference reported.
3. ``calibrate`` and ``survival``: ``heal calibrate`` then ``heal survival`` with ``--device cuda --dtype bfloat16``.
4. ``fsdp``: ``heal fit --config gpu/fsdp --trainer.devices 1`` (``--trainer.devices 2`` and more when the
   machine has them: the sharded run that one device, NO_SHARD, cannot stand for).
5. ``barrier cost`` / ``barrier memory``: ``benchmarks/barrier_cost.py`` and ``barrier_memory.py`` on the GPU.
6. ``8B bf16`` / ``8B nf4``: ``benchmarks/scale_step.py`` at Llama-3-8B's shape (random, built here), batch 8 x 2048,
   checkpointing on: one step of SFT and of SFT + rmse barrier, peak memory and step time (``--only scale`` runs
   just these; ``--only base`` steps 1-5).
7. ``survival 4B``: ``benchmarks/survival_scale.py``, one survival α on a Gemma-3-4B-shaped random model, 64 prompts x
   512 tokens in bf16: time and peak memory, batched forks against the per-prompt forks (``--only survival``).
8. ``survival 2 GPU``, where the machine has two or more: step 3's ``heal survival`` under ``torchrun
   --nproc_per_node 2`` (prompts shared, one writer), its table against step 3's one-GPU table.

Each row is printed as its step finishes (a step cut by the time budget still leaves the rows before it), and the
whole table again at the end. ``--budget`` (seconds, default 540) bounds the whole check: a step's time limit is
its own or what is left of the budget, whichever is smaller.

The model is built here, not downloaded (the GPU machine may have no network): a randomly initialised Llama of
SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, tied head) with heal_pl's tiny
tokenizer (vocabulary ≈ 800), saved to a folder that every command takes as ``model``. Numbers that depend on
trained weights (c*, pmass, the survival table) are therefore about a random model; timings and memory are
SmolLM2-shaped except for the small vocabulary (the barrier memory benchmark uses Gemma-3's 262 144 × 2560 head).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOL = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "max_position_embeddings": 2048, "tie_word_embeddings": True}  # fmt: skip


def build_model(folder: Path, dry: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from heal_pl.models.load import tiny_tokenizer

    tok = tiny_tokenizer()
    shape = {**SMOL, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128} if dry else SMOL  # fmt: skip
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, **shape)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def fit(model: str, precision: str, out: Path, accelerator: str) -> dict:
    """``heal fit`` of heal_pl/configs/route.yaml with a gradient probe before the routing callback."""
    import lightning as L
    import torch

    from heal_pl.cli import HealCLI
    from heal_pl.data.datamodule import HealDataModule
    from heal_pl.module import HealModule

    seen: list[dict] = []

    class Probe(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            entry = {"norm": norm, "scale": None, "stage": None}
            if scaler is not None:
                entry["scale"] = float(scaler.get_scale())
                entry["stage"] = scaler._per_optimizer_states[id(optimizer)]["stage"].name
            seen.append(entry)

    args = ["--config", str(ROOT / "heal_pl" / "configs" / "route.yaml"), "--model.model", model,
            "--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.precision", precision,
            "--trainer.max_steps", "6", "--trainer.val_check_interval", "6",
            "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false",
            "--data.batch_size", "8"]  # fmt: skip
    cli = HealCLI(HealModule, HealDataModule, args=args, run=False, save_config_kwargs={"overwrite": True},
                  parser_kwargs={"default_env": False})  # fmt: skip
    route = next(i for i, c in enumerate(cli.trainer.callbacks) if type(c).__name__ == "RouteAblateEvalCallback")
    cli.trainer.callbacks.insert(route, Probe())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    routed = cli.trainer.callbacks[route + 1].last_metrics
    return {"steps": len(seen), "probe": seen, "route": routed}


def forks_cuda(device: str) -> dict:
    """Fast forks == recompute on ``device`` (float32) for tiny Gemma-3 and Qwen3.5; bf16 max difference too."""
    import numpy as np
    import torch

    from heal_pl.models.load import tiny_tokenizer
    from heal_pl.steering import SteeringVector
    from heal_pl.survival.forks import fork_probe, fork_probe_recompute
    from heal_pl.survival.probes import answer_token_ids
    from tests.helpers import lively

    tok = tiny_tokenizer()
    ids = answer_token_ids(tok)
    prompt = "<|im_start|>user\nIs the sun cold?<|im_end|>\n<|im_start|>assistant\n"
    out = {}
    for family in ("gemma3", "qwen3_5"):
        for dtype in (torch.float32, torch.bfloat16):
            model = lively(family).to(device=device, dtype=dtype)
            g = torch.Generator().manual_seed(0)
            vec = SteeringVector("mean_diff", {0: torch.randn(64, generator=g), 1: torch.randn(64, generator=g)})
            args = (model, tok, prompt, vec, 8.0, 48, 4, "\nAnswer (true or false):", ids)
            fast, ref = fork_probe(*args, eos_token_id=[]), fork_probe_recompute(*args, eos_token_id=[])
            same_tokens = bool(torch.equal(fast.tokens, ref.tokens))
            rel = float(np.nanmax(np.abs(fast.pmass - ref.pmass) / ref.pmass)) if same_tokens else float("nan")
            out[f"{family} {str(dtype).removeprefix('torch.')}"] = {"same_tokens": same_tokens, "max_rel": rel}
        assert out[f"{family} float32"]["same_tokens"] and out[f"{family} float32"]["max_rel"] < 1e-4, out
    return out


DEADLINE = [float("inf")]  # perf_counter() time by which the whole check must be done (--budget)


def run_step(name: str, cmd: list[str], limit: float, results: list, logs: Path) -> str:
    t0 = time.perf_counter()
    limit = min(limit, DEADLINE[0] - t0)
    if limit < 20:
        results.append({"check": name, "status": "SKIPPED (budget spent)", "seconds": 0.0, "out": ""})
        print(f"| {name} | SKIPPED (budget spent) | 0 | |", flush=True)
        return ""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
        status = "ok" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
        text = done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        status, text = f"FAILED (over {limit:.0f} s)", f"{err.stdout or ''}{err.stderr or ''}"
    seconds = time.perf_counter() - t0
    (logs / f"{name.replace(' ', '_')}.log").write_text(text if isinstance(text, str) else text.decode())
    if status != "ok":
        print(f"--- {name}: {status}; last lines:\n" + "\n".join(str(text).splitlines()[-25:]), flush=True)
    results.append({"check": name, "status": status, "seconds": round(seconds, 1), "out": str(text)})
    print(f"| {name} | {status} | {seconds:.0f} | {table_lines(str(text))[:300]} |", flush=True)  # now, in case
    return str(text)


def last_json(text: str) -> dict:
    line = next((x for x in reversed(text.splitlines()) if x.startswith("RESULT ")), None)
    return json.loads(line.removeprefix("RESULT ")) if line else {}


def table_lines(text: str) -> str:
    return " / ".join(x.strip() for x in text.splitlines() if x.startswith("| ") and "---" not in x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="run on the CPU with tiny sizes (no 16-mixed, no FSDP)")
    p.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK", "/tmp/heal_gpu_check"))
    p.add_argument("--only", choices=["all", "base", "scale", "survival"], default="all",
                   help="which steps (module docstring)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole check")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    a = p.parse_args()
    work, dry = Path(a.work), a.dry_run
    model, device = str(work / "smollm2-shaped"), "cpu" if a.dry_run else "cuda"
    if a.step == "fit":
        print("RESULT " + json.dumps(fit(model, a.precision, work / f"fit_{a.precision}", "cpu" if dry else "gpu")))
        return
    if a.step == "forks":
        print("RESULT " + json.dumps(forks_cuda(device)))
        return
    import torch

    if not dry and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); this check needs one "
                 "(or pass --dry-run to run its steps on the CPU)")  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    gpu = "CPU (dry run)"
    if not dry:
        gpu = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    t_all = time.perf_counter()
    DEADLINE[0] = t_all + a.budget
    build_model(Path(model), dry)
    py, me, results = sys.executable, str(Path(__file__).resolve()), []
    if a.only in ("all", "scale"):
        scale(py, work, dry, results, logs)
    if a.only in ("all", "survival"):
        run_step("survival 4B", [py, "benchmarks/survival_scale.py", *(["--dry-run"] if dry else [])], 480, results,
                 logs)  # fmt: skip
    if a.only in ("all", "base"):
        base_steps(py, me, work, model, device, dry, results, logs)
    report(gpu, torch.__version__, time.perf_counter() - t_all, results, logs)


def scale(py: str, work: Path, dry: bool, results: list, logs: Path) -> None:
    """The 8B steps: build the random model once, then one process per base (bf16, nf4)."""
    folder, flag = str(work / "llama8b-shaped"), ["--dry-run"] if dry else []
    run_step("8B build", [py, "benchmarks/scale_step.py", "--build", "--folder", folder, *flag], 240, results, logs)
    for quantize in ("none", "nf4"):
        run_step(f"8B {'bf16' if quantize == 'none' else quantize}", [py, "benchmarks/scale_step.py", "--folder",
                 folder, "--quantize", quantize, *flag], 240, results, logs)  # fmt: skip


def base_steps(py: str, me: str, work: Path, model: str, device: str, dry: bool, results: list, logs: Path) -> None:
    """Every step but the 8B ones (module docstring, 1-5)."""
    base = [me, "--work", str(work)] + (["--dry-run"] if dry else [])
    fits = {}
    for precision in ["bf16-mixed"] + ([] if dry else ["16-mixed"]):
        fits[precision] = last_json(run_step(f"fit {precision}", [py, *base, "--step", "fit", "--precision",
                                                                    precision], 240, results, logs))  # fmt: skip
    if "16-mixed" in fits and fits["16-mixed"] and fits["bf16-mixed"]:
        half, bf = fits["16-mixed"]["probe"], fits["bf16-mixed"]["probe"]
        finite = [e for e in half if e["norm"] == e["norm"] and e["norm"] != float("inf")]
        ratio = sorted(e["norm"] for e in finite)[len(finite) // 2] / sorted(e["norm"] for e in bf)[len(bf) // 2]
        unscaled = all(e["stage"] == "UNSCALED" for e in half) and min(e["scale"] for e in half) >= 256
        ok = unscaled and 1 / 8 < ratio < 8
        results.append({"check": "routing sees unscaled grads (16-mixed)", "status": "ok" if ok else "FAILED",
                        "seconds": 0.0, "out": f"scaler stage at the hook: {sorted({e['stage'] for e in half})}, "
                        f"scale ≥ {min(e['scale'] for e in half):.0f}, median grad norm 16-mixed ÷ bf16-mixed = "
                        f"{ratio:.2f}"})  # fmt: skip
    forks = last_json(run_step("forks == recompute", [py, *base, "--step", "forks"], 180, results, logs))
    for r in results:  # the details the final table shows for these rows
        if r["check"] == "forks == recompute" and forks:
            r["detail"] = ", ".join(f"{k}: max rel {v['max_rel']:.1e}" if v["same_tokens"] else
                                    f"{k}: greedy tokens differ" for k, v in forks.items())  # fmt: skip
        if r["check"].startswith("fit") and fits.get(r["check"].split()[1]):
            f = fits[r["check"].split()[1]]
            r["detail"] = f"{f['steps']} steps, route metrics {f['route']}"
    cli = [py, "-m", "heal_pl.cli"]
    hw = ["--model", model, "--device", device, "--dtype", "bfloat16"]
    run_step("calibrate bf16", [*cli, "calibrate", "--config", "heal_pl/configs/calibrate.yaml", *hw, "--n_fit", "8",
                                "--n_calib", "4", "--n_audit", "4", "--max_iters", "4", "--out_dir",
                                str(work / "calibrate")], 240, results, logs)  # fmt: skip
    survival = ["survival", "--config", "heal_pl/configs/survival.yaml", *hw, "--calib_json",
                str(work / "calibrate" / "calib.json"), "--n_eval", "8", "--w", "64", "--alphas", "[0, 1, 4]"]
    run_step("survival bf16", [*cli, *survival, "--out_dir", str(work / "survival")], 240, results, logs)
    if not dry:
        import torch

        n = min(torch.cuda.device_count(), 8)
        if n >= 2:  # the sharded run: its table against the one-GPU table above
            run_step("survival 2 GPU", [py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                                        "heal_pl.cli", *survival, "--out_dir", str(work / "survival_2gpu")], 240,
                     results, logs)  # fmt: skip
            results[-1]["detail"] = same_tables(work / "survival", work / "survival_2gpu")
        run_step(f"fsdp {n} GPU", [*cli, "fit", "--config", "heal_pl/configs/gpu/fsdp.yaml", "--trainer.devices",
                                   str(n), "--model.model", model, "--trainer.max_steps", "6",
                                   "--trainer.val_check_interval", "6", "--trainer.logger.init_args.save_dir",
                                   str(work / "fsdp"), "--trainer.enable_progress_bar", "false"], 240, results,
                 logs)  # fmt: skip
    size = ["--batch", "2", "--seq", "64"] if dry else ["--batch", "8", "--seq", "512", "--steps", "5"]
    run_step("barrier cost", [py, "benchmarks/barrier_cost.py", "--model", model, "--device", device,
                              "--dtype", "float32" if dry else "bfloat16", *size], 180, results, logs)  # fmt: skip
    mem = ["--batch", "2", "--seq", "64", "--vocab", "4096", "--hidden", "64"] if dry else \
        ["--batch", "4", "--seq", "1024", "--vocab", "262144", "--hidden", "2560"]  # fmt: skip
    run_step("barrier memory", [py, "benchmarks/barrier_memory.py", "--device", device, *mem], 180, results, logs)


def same_tables(one: Path, two: Path) -> str:
    """How the 2-GPU survival table compares with the one-GPU table (deaths per α, kl_p95)."""
    try:
        a, b = (json.loads((d / "summary.json").read_text())["table"] for d in (one, two))
    except (OSError, KeyError, ValueError) as err:
        return f"no table to compare ({err})"
    died = [(r["label"], r["died"], s["died"]) for r, s in zip(a, b, strict=True)]
    kl = max(abs(r["kl_p95"] - s["kl_p95"]) / max(abs(r["kl_p95"]), 1e-12) for r, s in zip(a, b, strict=True))
    return f"deaths (1 GPU, 2 GPU) per α: {died}; max relative Δ kl_p95 {kl:.1e}"


def report(gpu: str, torch_version: str, seconds: float, results: list, logs: Path) -> None:
    """The whole table, again, at the end; exit status 1 when a step failed or was skipped."""
    print(f"\nheal_pl GPU check on {gpu}, torch {torch_version}, total {seconds:.0f} s\n")
    print("| check | status | s | result |\n|---|---|---|---|")
    for r in results:
        detail = r.get("detail") or (r["out"] if r["check"].startswith("routing") else table_lines(r["out"])[:300])
        print(f"| {r['check']} | {r['status']} | {r['seconds']} | {detail} |")
    print(f"\nlogs: {logs}")
    if any(r["status"] != "ok" for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
