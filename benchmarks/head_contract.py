"""Issue-12 numbers: heal_pl's KL / NLL against the float64 KL of the model's own logits, on tiny random models.

    HEAL_PL_CACHE=/tmp/cache python benchmarks/head_contract.py

Each line compares what heal_pl reports (``HealModule.loss_terms`` or ``KLBarrierCallback.compute``) with the
truth computed from ``model(...).logits`` (adapter on vs off, eval mode, float64 log-softmax). Rows: Cohere and
Granite (logit scaling), a LoRA on ``lm_head`` (HealModule refuses it; the callback keeps it out of the ref),
GPT-2 with dropout 0.1 and a zero adapter in train mode, a zero adapter under the callback on Cohere / Granite.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch
from peft import LoraConfig, get_peft_model

from heal_pl.adapters.lora import LoRASpec
from heal_pl.barrier.kl import KLBarrier
from heal_pl.callbacks import KLBarrierCallback
from heal_pl.models.load import tiny_model
from heal_pl.module import HealModule

MEAN = KLBarrier(agg="mean", tau=0.0)


class Foreign(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model


def batch(B: int = 3, T: int = 14) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 300, (B, T), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def truth(peft: torch.nn.Module, b: dict) -> tuple[float, float]:
    inp = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    peft.eval()
    with torch.no_grad():
        s = peft(**inp).logits.double()
        with peft.disable_adapter():
            r = peft(**inp).logits.double()
    lp, lq = s[:, :-1].log_softmax(-1), r[:, :-1].log_softmax(-1)
    nxt = b["labels"][:, 1:]
    keep = nxt != -100
    kl = (lp.exp() * (lp - lq)).sum(-1)[keep]
    nll = -lp.gather(-1, nxt.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep]
    return kl.mean().item(), nll.mean().item()


def perturb(model: torch.nn.Module, scale: float) -> None:
    torch.manual_seed(0)  # dropout masks after this
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ("lora_A" in name and "lm_head" in name):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def callback_kl(peft: torch.nn.Module, b: dict) -> dict:
    module, cb = Foreign(peft), KLBarrierCallback(MEAN)
    cb.setup(None, module, "fit")  # type: ignore[arg-type]
    try:
        return cb.compute(b, peft(**b).logits)[1]
    finally:
        cb.teardown(None, module, "fit")  # type: ignore[arg-type]


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    b = batch()
    for family in ("cohere", "granite"):
        m = HealModule(model=f"tiny-{family}", barrier=MEAN)
        perturb(m, 4.0)
        _, scalars, kl = m.loss_terms(b)
        t_kl, t_nll = truth(m.student, b)
        nll = scalars["sft"].item()
        print(f"{family}: KL {kl.mean().item():.6g} (true {t_kl:.6g}), NLL {nll:.6g} (true {t_nll:.6g})")
    try:
        m = HealModule(model="tiny-llama", lora=LoRASpec(target_modules=("q_proj", "v_proj", "lm_head")), barrier=MEAN)
        perturb(m, 1.0)
        kl = m.loss_terms(b)[2].mean().item()
        print(f"lm_head LoRA, HealModule: KL {kl:.6g} (true {truth(m.student, b)[0]:.6g})")
    except ValueError as e:
        print(f"lm_head LoRA, HealModule: refused ({str(e)[:80]}...)")
    peft = get_peft_model(tiny_model("llama"), LoraConfig(r=8, target_modules=["q_proj", "v_proj", "lm_head"]))
    perturb(peft, 1.0)
    peft.eval()
    print(f"lm_head LoRA, KLBarrierCallback: KL {float(callback_kl(peft, b)['kl_mean']):.6g} "
          f"(true {truth(peft, b)[0]:.6g})")
    m = HealModule(model="tiny-gpt2", lora=LoRASpec(target_modules=("c_attn",)), barrier=MEAN).train()
    print(f"gpt2 (dropout 0.1), zero adapter, train mode: HealModule mean KL {m.loss_terms(b)[2].mean().item():.6g}")
    for family in ("cohere", "granite"):
        peft = get_peft_model(tiny_model(family), LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).train()
        s = callback_kl(peft, b)
        kl_mean, kl_max = float(s["kl_mean"]), float(s["kl_max"])
        print(f"{family}, zero adapter, KLBarrierCallback: mean KL {kl_mean:.6g}, max {kl_max:.3g}")


if __name__ == "__main__":
    main()
