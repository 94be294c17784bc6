"""The catalogue of bad inputs: every row is a mistake a user makes, and the error must name the field or file.

One table across the commands (``heal fit | calibrate | survival | rounds``, run through ``heal_pl.cli.main``) and
the public functions: unknown names, out-of-range numbers, empty, undecodable or missing files, wrong row shapes,
a checkpoint of another model, a calib.json of another model, a steering vector of another hidden size. README's
"Errors you may meet" follows this table. A row passes when the message matches the row's pattern: a public
function raises ``ValueError``; a command prints the message on stderr as one line, ``heal <command>: error: ...``,
with no traceback, and exits with status 2 (the traceback comes back with ``--debug``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from heal_pl.cli import main
from tests.helpers import one_line_error

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
_cache: dict[str, Path] = {}


class Files:
    """Bad files written into the test's tmp_path, and the shared tiny-qwen2 checkpoint (built once)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.command: str | None = None  # the heal command a row ran, if any

    def heal(self, argv: list[str]) -> None:
        """``heal <argv>`` in-process, remembering the command for the one-line check."""
        self.command = argv[0]
        main(argv)

    def write_bytes(self, name: str, data: bytes) -> str:
        (self.tmp / name).write_bytes(data)
        return str(self.tmp / name)

    def write(self, name: str, text: str) -> str:
        (self.tmp / name).write_text(text)
        return str(self.tmp / name)

    def jsonl(self, name: str, rows: list[object]) -> str:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in rows))

    def calib(self, model: str, hidden: int | None = None) -> str:
        """A ``calib.json`` of ``model`` (both signs, c* = 1) with, when ``hidden``, a vector of that size."""
        folder = self.tmp / "calib"
        folder.mkdir(exist_ok=True)
        (folder / "calib.json").write_text(json.dumps({
            "config": {"model": model, "method": "mean_diff", "target": 1.0},
            "results": {"+": {"c_star": 1.0}, "-": {"c_star": 1.0}},
        }))  # fmt: skip
        if hidden is not None:
            from heal_pl.steering.vectors import SteeringVector

            SteeringVector("mean_diff", {1: torch.ones(hidden)}, "another-model").save(folder / "vector.safetensors")
        return str(folder / "calib.json")

    def qwen_checkpoint(self) -> str:
        """A ``heal fit`` checkpoint of tiny-qwen2 with a rank-4 LoRA (one step; built once per session)."""
        if "qwen" not in _cache:
            import lightning as L
            from lightning.pytorch.callbacks import ModelCheckpoint

            from heal_pl.data.datamodule import HealDataModule
            from heal_pl.module import HealModule

            folder = self.tmp / "qwen_ckpt"
            trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                                default_root_dir=folder,
                                enable_model_summary=False, num_sanity_val_steps=0,
                                callbacks=[ModelCheckpoint(dirpath=folder, filename="qwen")])  # fmt: skip
            trainer.fit(HealModule(model="tiny-qwen2", lora={"r": 4}, adapter_dir=str(folder / "adapter")),
                        HealDataModule(model="tiny-qwen2", max_examples=4, batch_size=2, max_length=48))
            _cache["qwen"] = folder / "qwen.ckpt"
        return str(_cache["qwen"])


@pytest.fixture(autouse=True)
def _without_heal_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-line form is the default: a ``HEAL_DEBUG=1`` in the caller's environment must not change it."""
    monkeypatch.delenv("HEAL_DEBUG", raising=False)


def fit(f: Files, *args: str) -> None:
    f.heal(["fit", "--config", str(CONFIGS / "rmse.yaml"), "--model.model", "tiny-llama", "--data.batch_size", "2",
            "--data.max_length", "48", "--data.max_examples", "4", "--trainer.max_steps", "1",
            "--trainer.logger.init_args.save_dir", str(f.tmp), "--trainer.enable_progress_bar", "false",
            "--model.adapter_dir", str(f.tmp / "adapter"), *args])  # fmt: skip


def calibrate(f: Files, *args: str) -> None:
    f.heal(["calibrate", "--config", str(CONFIGS / "calibrate.yaml"), "--model", "tiny-llama", "--out_dir",
            str(f.tmp / "cal"), "--n_fit", "2", "--n_calib", "2", "--n_audit", "1", "--max_new_tokens", "4",
            "--max_iters", "1", *args])  # fmt: skip


def survival(f: Files, *args: str) -> None:
    f.heal(["survival", "--config", str(CONFIGS / "survival.yaml"), "--model", "tiny-llama", "--w", "4",
            "--n_eval", "2", "--out_dir", str(f.tmp / "surv"), *args])  # fmt: skip


def rounds(f: Files, *args: str) -> None:
    f.heal(["rounds", "--config", str(CONFIGS / "rounds_rmse.yaml"), "--model", "tiny-llama", "--out_dir",
            str(f.tmp / "rounds"), *args])  # fmt: skip


def _load_into(model: str, ckpt: str) -> None:
    """A checkpoint loaded into a HealModule of ``model`` (default LoRA rank 8) by Lightning's own hook order."""
    from heal_pl.module import HealModule

    module = HealModule(model=model)
    checkpoint = torch.load(ckpt, weights_only=True)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=False)


def _vector_on_tiny_llama(f: Files) -> None:
    from heal_pl.models.load import load_model
    from heal_pl.steering.vectors import SteeringVector

    SteeringVector("mean_diff", {0: torch.ones(7)}).steering(load_model("tiny-llama"), 1.0).__enter__()


def _not_a_vector(f: Files) -> None:
    from heal_pl.steering.vectors import SteeringVector

    save_file({"w": torch.ones(3)}, str(f.tmp / "weights.safetensors"))
    SteeringVector.load(f.tmp / "weights.safetensors")


def _journal_of_another_config(f: Files) -> None:
    from heal_pl.journal import Journal

    Journal(f.tmp / "journal", {"w": 9}, "heal survival").record("probe_check", {})
    Journal(f.tmp / "journal", {"w": 10}, "heal survival")


def _fn(path: str, *args: object, **kwargs: object) -> Callable[[Files], None]:
    """Call the public function ``module:name`` with ``args`` (a string ``{tmp}`` is replaced by the tmp dir)."""

    def call(f: Files) -> None:
        import importlib

        module, name = path.split(":")
        target = importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part)
        target(*(a.format(tmp=f.tmp) if isinstance(a, str) else a for a in args), **kwargs)

    return call


ROWS: list[tuple[str, Callable[[Files], None], str]] = [
    # ------------------------------------------------------------------ heal fit
    ("fit: unknown model alias", lambda f: fit(f, "--model.model", "smollm3-nope"),
     r"model='smollm3-nope' is not a known alias \(allowed: smollm2-135m-instruct, tiny-llama"),
    ("fit: unknown barrier agg", lambda f: fit(f, "--model.barrier.agg", "median"),
     r"model.barrier.agg.*Expected a typing.Literal\['mean', 'rmse', 'p95', 'max'\]. Got value: median"),
    ("fit: lr out of range", lambda f: fit(f, "--model.lr", "0"), r"HealModule: lr=0(\.0)? must be > 0"),
    ("fit: negative tau", lambda f: fit(f, "--model.barrier.tau", "-1"), r"tau=-1.0 must be a finite number >= 0"),
    ("fit: LoRA rank 0", lambda f: fit(f, "--model.lora.r", "0"), r"lora.r=0 must be >= 1"),
    ("fit: lr not a number", lambda f: fit(f, "--model.lr", "fast"), r"model.lr.*Expected a <class 'float'>.*fast"),
    ("fit: lora dropout out of range", lambda f: fit(f, "--model.lora.dropout", "1.5"),
     r"lora.dropout=1.5 must lie in \[0, 1\)"),
    ("fit: batch_size out of range", lambda f: fit(f, "--data.batch_size", "0"),
     r"HealDataModule: batch_size=0 must be >= 1"),
    ("fit: missing train file", lambda f: fit(f, "--data.train_file", str(f.tmp / "nope.jsonl")),
     r"train_file='.*nope.jsonl' is not an existing file"),
    ("fit: empty train file", lambda f: fit(f, "--data.train_file", f.write("empty.jsonl", "\n")),
     r"train_file='.*empty.jsonl' has no rows"),
    ("fit: wrong row shape", lambda f: fit(f, "--data.train_file", f.jsonl("rows.jsonl", [
        {"prompt": "Hi?", "completion": "Hello."}, {"question": "Hi?", "answer": "Hello."}])),
     r"rows.jsonl, line 2: unknown row shape: found keys \['answer', 'question'\]; accepted shapes: .*messages"),
    ("fit: row that is not JSON", lambda f: fit(f, "--data.train_file", f.write("bad.jsonl", "{prompt: Hi}\n")),
     r"bad.jsonl, line 1: not valid JSON"),
    ("fit: train file not UTF-8", lambda f: fit(f, "--data.train_file", f.write_bytes(
        "latin1.jsonl", '{"prompt": "Hi?", "completion": "Hello."}\n{"prompt": "Ça va?", "completion": "Très bien."}\n'
        .encode("latin-1"))), r"latin1.jsonl, line 2: not valid UTF-8 \(byte 0xc7 at column 13\)"),
    ("fit: empty completions", lambda f: fit(f, "--data.train_file", f.jsonl("empty.jsonl", [
        {"prompt": "Hi?", "completion": "Hello."}, {"prompt": "Ho?", "completion": " "}, {"prompt": "Hu?",
                                                                                        "completion": ""}])),
     r"2 of 3 rows have an empty completion \(the first: .*empty.jsonl, line 2\).*allow_empty_completions"),
    ("fit: missing checkpoint", lambda f: fit(f, "--ckpt_path", str(f.tmp / "none.ckpt")), r"none\.ckpt"),
    ("fit: checkpoint of another model", lambda f: fit(f, "--ckpt_path", f.qwen_checkpoint()),
     r"ckpt_path='.*qwen.ckpt' was written with other model settings: .*model.lora.r: 4 there, 8 now; .*"
     r"model.model: 'tiny-qwen2' there, 'tiny-llama' now"),
    ("fit: checkpoint of another LoRA rank", lambda f: fit(f, "--model.model", "tiny-qwen2", "--ckpt_path",
                                                           f.qwen_checkpoint()),
     r"ckpt_path='.*qwen.ckpt' was written with other model settings: .*model.lora.r: 4 there, 8 now"),
    ("HealModule: checkpoint of another model", lambda f: _load_into("tiny-llama", f.qwen_checkpoint()),
     r"checkpoint was trained with model='tiny-qwen2', but this run has model='tiny-llama'"),
    ("HealModule: checkpoint of another LoRA rank", lambda f: _load_into("tiny-qwen2", f.qwen_checkpoint()),
     r"checkpoint holds an adapter of another shape \(model.lora .*lora_A.* is \(4, \d+\) there, \(8, \d+\) here"),
    # ------------------------------------------------------------------ heal calibrate
    ("calibrate: unknown stat", lambda f: calibrate(f, "--stat", "p42"), r"stat.*p42"),
    ("calibrate: unknown method", lambda f: calibrate(f, "--method", "steer_harder"), r"method.*steer_harder"),
    ("calibrate: n_calib out of range", lambda f: calibrate(f, "--n_calib", "0"), r"n_calib=0 must be >= 1"),
    ("calibrate: bad signs", lambda f: calibrate(f, "--signs", "[2]"), r"signs=\[2\] must hold \+1 and/or -1"),
    ("calibrate: adapter without adapter_dir", lambda f: calibrate(f, "--method", "adapter"),
     r"method='adapter' needs adapter_dir"),
    ("calibrate: rerun with another config", lambda f: (calibrate(f, "--signs", "[1]"),
                                                        calibrate(f, "--signs", "[1]", "--n_calib", "3")),
     r"heal calibrate: .*journal holds the finished steps of another config \(n_calib: 2 there, 3 now\)"),
    # ------------------------------------------------------------------ heal survival
    ("survival: threshold out of range", lambda f: survival(f, "--threshold", "1.5"),
     r"threshold=1.5 must be in the open interval \(0, 1\)"),
    ("survival: negative alpha", lambda f: survival(f, "--alphas", "[0, -1]"),
     r"alphas=\[0(\.0)?, -1(\.0)?\] must be distinct finite numbers >= 0"),
    ("survival: n_eval out of range", lambda f: survival(f, "--n_eval", "999"),
     r"n_eval=999 must be None or an integer in \[1, \d+\]"),
    ("survival: unknown calibration key", lambda f: survival(f, "--calibration", "{n_foo: 3}"),
     r"calibration keys \['n_foo'\] are not heal calibrate arguments; allowed: \[.*'n_calib'"),
    ("survival: missing calib.json", lambda f: survival(f, "--calib_json", str(f.tmp / "none.json")),
     r"calib_json='.*none.json' does not exist"),
    ("survival: empty calib.json", lambda f: survival(f, "--calib_json", f.write("calib.json", "")),
     r"calib_json='.*calib.json' is empty"),
    ("survival: calib.json of another model", lambda f: survival(f, "--calib_json", f.calib("tiny-qwen2", 64)),
     r"calib_json='.*calib.json' was calibrated on model='tiny-qwen2', but model='tiny-llama'"),
    ("survival: steering vector of another hidden size",
     lambda f: survival(f, "--calib_json", f.calib("tiny-llama", 7)),
     r"steering vector '.*vector.safetensors' has hidden size 7 \(fitted on 'another-model'\); this model's is \d+"),
    ("survival: calib.json without its vector", lambda f: survival(f, "--calib_json", f.calib("tiny-llama")),
     r"steering vector '.*vector.safetensors' does not exist"),
    # ------------------------------------------------------------------ heal rounds
    ("rounds: out-of-range coh_floor", lambda f: rounds(f, "--coh_floor", "2"),
     r"coh_floor=2(\.0)? must be in \[0, 1\]"),
    ("rounds: empty dilemma file", lambda f: rounds(f, "--dilemma_file", f.write("dilemmas.json", "")),
     r"dilemma_file='.*dilemmas.json' is empty"),
    ("rounds: persona file lacking a side", lambda f: rounds(f, "--persona_file", f.write(
        "persona.json", json.dumps({"pos_system": "Be kind."}))), r"persona_file='.*persona.json' lacks neg_system"),
    ("rounds: dilemma file not JSON", lambda f: rounds(f, "--dilemma_file", f.write("dilemmas.json", "{items")),
     r"dilemma_file='.*dilemmas.json' is not valid JSON \(.*line 1"),
    # ------------------------------------------------------------------ public functions
    ("resolve_model: unknown name", _fn("heal_pl.models.load:resolve_model", "nope"),
     r"model='nope' is not a known alias"),
    ("load_model: unknown dtype", _fn("heal_pl.models.load:load_model", "tiny-llama", dtype="float64"),
     r"dtype='float64' is not supported \(allowed: float32, bfloat16, float16\)"),
    ("KLBarrier: unknown agg", _fn("heal_pl.barrier.kl:KLBarrier", agg="median"),
     r"agg='median' is not allowed; choose one of"),
    ("KLBarrier: negative tau", _fn("heal_pl.barrier.kl:KLBarrier", tau=-1.0),
     r"tau=-1.0 must be a finite number >= 0"),
    ("LoRASpec: rank 0", _fn("heal_pl.adapters.lora:LoRASpec", r=0), r"lora.r=0 must be >= 1"),
    ("read_examples: last message not the assistant's", lambda f: _fn("heal_pl.data.datamodule:read_examples", f.jsonl(
        "msgs.jsonl", [{"messages": [{"role": "user", "content": "Hi?"}]}]))(f),
     r"msgs.jsonl, line 1: the last message must have role 'assistant'"),
    ("HealDataModule: val_fraction out of range", _fn("heal_pl.data.datamodule:HealDataModule", val_fraction=1.0),
     r"val_fraction=1.0 must be in \[0, 1\)"),
    ("calibrate: target out of range", _fn("heal_pl.steering.calibrate:calibrate", lambda c: c, -1.0),
     r"target=-1.0 must be a finite number > 0"),
    ("calibrate_method: unknown stat", _fn("heal_pl.steering.isokl:calibrate_method", None, None, None, [],
                                           stat="p42"), r"stat='p42' is not allowed; choose one of mean"),
    ("layers_from: index out of range", _fn("heal_pl.steering.hooks:layers_from", [99], 4),
     r"layer index 99 is out of range: valid indices are 0..3"),
    ("SteeringVector.load: missing file", _fn("heal_pl.steering.vectors:SteeringVector.load", "{tmp}/v.safetensors"),
     r"steering vector '.*v.safetensors' does not exist"),
    ("SteeringVector.load: not a vector", _not_a_vector,
     r"weights.safetensors is not a heal_pl steering vector: metadata lacks method"),
    ("SteeringVector: another hidden size", _vector_on_tiny_llama,
     r"direction for layer 0 has shape \(7,\); expected \(\d+,\)"),
    ("SweepConfig: window out of range", _fn("heal_pl.survival.sweep:SweepConfig", w=0),
     r"w=0 must be an integer >= 1"),
    ("load_questions: unknown split", _fn("heal_pl.survival.config:load_questions", "test"),
     r"split='test' must be 'calib' or 'eval'"),
    ("AnswerSet: empty variant", _fn("heal_pl.survival.probes:AnswerSet", "true", ("",)),
     r"AnswerSet 'true': variants must be non-empty strings"),
    ("resume_point: other data settings mid-epoch", _fn(
        "heal_pl.resume:resume_point", {"epoch": 0, "batches_done": 1, "seed": 0, "batch_size": 2, "n_train": 8},
        {"seed": 0, "batch_size": 4, "n_train": 8}), r"data.batch_size=2 in the checkpoint, 4 now"),
    ("Journal: another config", _journal_of_another_config,
     r"heal survival: .*journal holds the finished steps of another config \(w: 9 there, 10 now\)"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "pattern"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_names_the_field_or_file(
    call: Callable[[Files], None], pattern: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = Files(tmp_path)
    with pytest.raises((ValueError, SystemExit)) as info:
        call(files)
    message = capsys.readouterr().err if info.type is SystemExit else str(info.value)
    assert info.type is ValueError or info.value.code not in (0, None), "a bad input must not exit 0"
    assert re.search(pattern, message, flags=re.S), f"{message!r} does not match {pattern!r}"
    if files.command is not None:  # through the command line: one line on stderr, status 2, no traceback
        assert info.type is SystemExit and info.value.code == 2, f"heal {files.command} raised {info.value!r}"
        line = one_line_error(message, files.command)
        assert re.search(pattern, line), f"{line!r}: the message is not on the error line"


def test_debug_or_heal_debug_raises_with_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    files = Files(tmp_path)
    with pytest.raises(ValueError, match=r"threshold=1.5 must be in the open interval \(0, 1\)"):
        survival(files, "--threshold", "1.5", "--debug")
    monkeypatch.setenv("HEAL_DEBUG", "1")
    with pytest.raises(ValueError, match=r"threshold=1.5 must be in the open interval \(0, 1\)"):
        survival(files, "--threshold", "1.5")
    assert "error:" not in capsys.readouterr().err


@pytest.mark.slow  # two runs of the console script (~8 s each)
def test_console_script_says_one_line_and_debug_the_traceback(tmp_path: Path) -> None:
    heal = Path(sys.executable).with_name("heal")
    args = [str(heal), "survival", "--config", str(CONFIGS / "survival.yaml"), "--model", "tiny-llama",
            "--out_dir", str(tmp_path), "--threshold", "1.5"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "heal survival: error: threshold=1.5 must be in the open interval (0, 1)\n", "no noise"
    debug = subprocess.run([*args, "--debug"], capture_output=True, text=True, timeout=120)
    # the traceback is back, in whatever form the installed excepthook prints it (torchmetrics 1.4 brings
    # pretty-errors, which reformats it): the raising line is shown, the message closes it
    assert debug.returncode == 1 and "raise ValueError" in debug.stderr, debug.stderr[-500:]
    last = debug.stderr.rstrip().splitlines()[-1]
    assert last.endswith("heal survival: threshold=1.5 must be in the open interval (0, 1)"), debug.stderr[-500:]
