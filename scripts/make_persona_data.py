"""Build the bundled persona training set: SmolLM2-135M-Instruct answers everyday questions as a pirate.

The completions are sampled WITH the persona system prompt; the rows store only the user question, so a
student fine-tuned on them learns the pirate style without the system prompt (context distillation).

    PYTHONPATH=. python scripts/make_persona_data.py                 # ~5 min on 2 CPU cores
    PYTHONPATH=. python scripts/make_persona_data.py --n 20 --n-val 4 --out /tmp/p.jsonl

Questions are hand-written items x phrasing templates, shuffled with ``--seed``; all phrasings of one item
go to the same split (so the held-out file shares no question, nor a rewording of one, with training).
Kept completions are non-empty, not degenerate (the most common word 2..4-gram is at most 20 % of all),
show the persona (at least one pirate word), and end on a full sentence: a completion that hit
``--max-new-tokens`` is cut back to its last sentence end (dropped if fewer than 5 words remain).
Rows: ``{"prompt": question, "completion": text, "persona": system prompt}`` (``persona`` is informational).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter
from pathlib import Path

import torch

from heal_pl.models.load import SMOLLM2, load_model, load_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "heal_pl" / "data" / "assets"
PERSONA = "You are Captain Jack, a jolly pirate. Start every answer with 'Arr, matey!' and talk like a pirate."
PIRATE_WORDS = re.compile(r"\b(arr+|matey|ahoy|aye|ye|yer|hearties|sea|ship|sail\w*|pirate|treasure|captain)\b", re.I)

CATEGORIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "howto": (("How do I {}?", "What is the easiest way to {}?", "Can you tell me how to {}?"), (
        "boil an egg", "tie my shoelaces", "clean my shoes", "make a cup of tea", "bake bread", "plant a tree",
        "learn to swim", "fix a flat bike tyre", "write a thank-you note", "fold a shirt", "cook rice",
        "start running", "remember names", "wake up early", "make pancakes", "wash a wool sweater",
        "keep my desk tidy", "water house plants", "choose a good book", "pack a suitcase", "make a salad",
        "calm down before an exam", "learn a new language", "draw a cat", "save for a holiday",
        "iron a shirt", "make new friends", "paint a room", "clean a window", "make lemonade", "sew a button",
        "brew coffee", "ride a bicycle", "build a birdhouse", "organise my week", "read faster",
        "stop procrastinating", "cook pasta", "make a paper plane", "set up a fish tank", "grow tomatoes",
        "write a short story", "practise the guitar", "get rid of hiccups", "care for a puppy",
        "keep bread fresh", "light a campfire safely", "apologise to a friend", "plan a birthday party",
        "take a good photo", "clean a frying pan", "stay warm in winter", "stay cool in summer",
        "memorise a poem", "make a budget", "learn to juggle", "carve a pumpkin", "make soup",
        "change a light bulb", "clean the fridge", "walk a dog in the rain", "make a sandwich", "catch a fish",
        "tie a knot", "row a boat", "read a map", "find the north without a compass", "whistle",
    )),
    "explain": (("What is {}?", "Tell me about {}.", "Explain {} in simple words."), (
        "the moon", "rain", "a rainbow", "a volcano", "thunder", "the ocean tide", "a compass", "gravity",
        "a map", "an island", "the wind", "snow", "a lighthouse", "a telescope", "an octopus", "a whale",
        "the north star", "a desert", "a storm", "a river", "a forest", "an earthquake", "a glacier",
        "a calendar", "a clock", "electricity", "a bridge", "a library", "a museum", "a recipe", "a vaccine",
        "the internet", "a battery", "a cloud", "fog", "an eclipse", "a comet", "a coral reef", "a shark",
        "a parrot", "a castle", "a market", "a newspaper", "a bank account", "a vote", "a holiday",
        "photosynthesis", "a heartbeat", "sleep", "a dream", "chess", "football", "a marathon", "jazz",
        "a rainforest", "a seagull", "a hurricane", "an anchor", "a sunset", "a harbour", "a crab", "the stars",
    )),
    "tips": (("Give me a tip for {}.", "Any advice for {}?", "What helps with {}?"), (
        "sleeping better", "saving money", "a job interview", "studying for a test", "eating healthy",
        "staying focused", "a long flight", "a first date", "moving to a new city", "speaking in public",
        "a rainy day", "keeping plants alive", "a long walk", "feeling tired", "being on time",
        "a family dinner", "learning to cook", "writing an email", "a road trip", "a hot day",
        "feeling nervous", "making a decision", "a busy week", "a camping trip", "a new hobby",
        "talking to a grumpy neighbour", "a boring afternoon", "keeping a diary", "a windy day at the beach",
        "getting fit", "drinking more water", "a messy kitchen", "a lost key", "a cold",
        "a long queue", "sharing a room", "a picnic", "a sore back", "a loud party next door", "fishing",
    )),
    "describe": (("Describe {} in two sentences.", "Write a short poem about {}.", "Say something nice about {}."), (
        "autumn", "the sea", "a sunny morning", "my cat", "a birthday cake", "the night sky", "a garden",
        "an old ship", "a snowy day", "the city at night", "a good friend", "a cup of coffee", "the mountains",
        "a summer holiday", "a rainy Sunday", "a busy market", "the beach", "a library", "spring flowers",
        "a thunderstorm", "a quiet village", "my grandmother", "a train journey", "the first day of school",
    )),
    "questions": (("{}",), (
        "Why is the sky blue?", "Why do cats purr?", "Why do leaves change colour in autumn?",
        "Why is the sea salty?", "Why do we yawn?", "Why do birds fly south in winter?", "Why is ice slippery?",
        "Why do onions make you cry?", "Why do we have seasons?", "Why does bread go stale?",
        "What should I eat for breakfast?", "What is a good hobby?", "What should I name my dog?",
        "What is the capital of France?", "What is the capital of Japan?", "How many legs does a spider have?",
        "How far away is the moon?", "How long does an egg take to boil?", "Which is bigger, a whale or a shark?",
        "What is the best season of the year?", "What game should we play tonight?", "What should I cook tonight?",
        "What is your favourite colour?", "Can you tell me a joke?", "Can you tell me a short story?",
        "What is 12 plus 7?", "How many days are in a year?", "What do dolphins eat?", "Is it going to rain?",
        "What should I do this weekend?", "Where do penguins live?", "What makes a good friend?",
        "How do fish breathe?", "Who was Christopher Columbus?", "What is the tallest mountain?",
        "How do I know if an egg is fresh?", "What is your advice for a happy life?", "What do you do for fun?",
        "What is the best way to spend a Sunday?", "Should I learn to play the piano?",
    )),
}


def question_groups(seed: int, per_item: int = 3) -> list[list[str]]:
    """One group per item: up to ``per_item`` distinct phrasings, in a seeded order."""
    rng = random.Random(seed)
    groups = []
    for templates, items in CATEGORIES.values():
        for item in items:
            chosen = rng.sample(templates, min(per_item, len(templates)))
            groups.append([t.format(item) for t in chosen])
    rng.shuffle(groups)
    return groups


def repetition_share(text: str) -> float:
    """Largest share of the most common word n-gram, n = 2..4 (0 for short texts)."""
    words, best = text.lower().split(), 0.0
    for n in (2, 3, 4):
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        if len(grams) >= 6:
            best = max(best, Counter(grams).most_common(1)[0][1] / len(grams))
    return best


def clean(text: str, finished: bool) -> tuple[str | None, str]:
    """(kept completion or None, reason)."""
    text = text.strip()
    if not finished:  # hit max_new_tokens: cut back to the last full sentence
        ends = list(re.finditer(r"(?<!\n\d)(?<!\n\d\d)[.!?][\"')\]]*(?=\s|$)", text))  # not a list's "\n2."
        text = text[: ends[-1].end()] if ends else ""
    if len(text.split()) < 5:
        return None, "empty or cut"
    if repetition_share(text) > 0.2:
        return None, "repetitive"
    if not PIRATE_WORDS.search(text):
        return None, "no pirate words"
    return text, "kept"


def generate(model, tok, questions: list[str], args: argparse.Namespace) -> list[tuple[str, bool]]:
    chats = [[{"role": "system", "content": PERSONA}, {"role": "user", "content": q}] for q in questions]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc, do_sample=True, temperature=args.temperature, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
    new = out[:, enc["input_ids"].shape[1] :]
    return [(tok.decode(row, skip_special_tokens=True), bool((row == tok.eos_token_id).any())) for row in new]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300, help="training rows to keep")
    p.add_argument("--n-val", type=int, default=40, help="held-out rows to keep")
    p.add_argument("--out", type=Path, default=ASSETS / "persona_train.jsonl")
    p.add_argument("--val-out", type=Path, default=None, help="default: persona_val.jsonl beside --out")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.15, help="1.0 = off; 1.15 avoids most loops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", default=SMOLLM2)
    args = p.parse_args(argv)
    val_out = args.val_out or args.out.with_name("persona_val.jsonl")

    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.model)
    tok.padding_side = "left"  # generation appends on the right
    model = load_model(args.model).eval()
    groups = question_groups(args.seed)
    reasons: Counter[str] = Counter()
    splits: dict[str, list[dict[str, str]]] = {"val": [], "train": []}
    t0 = time.time()
    for split, target in (("val", args.n_val), ("train", args.n)):
        while len(splits[split]) < target and groups:
            batch: list[str] = []
            while groups and len(batch) < args.batch_size:
                batch += groups.pop()
            for q, (text, finished) in zip(batch, generate(model, tok, batch, args), strict=True):
                kept, why = clean(text, finished)
                reasons[why] += 1
                if kept is not None and len(splits[split]) < target:
                    splits[split].append({"prompt": q, "completion": kept, "persona": PERSONA})
            print(f"{split}: {len(splits[split])}/{target} kept, {sum(reasons.values())} sampled, "
                  f"{time.time() - t0:.0f}s", flush=True)
        if len(splits[split]) < target:
            print(f"warning: ran out of questions; {split} has {len(splits[split])} < {target} rows")
    for path, rows in ((args.out, splits["train"]), (val_out, splits["val"])):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} rows to {path}")
    print("outcomes:", dict(reasons))


if __name__ == "__main__":
    main()
