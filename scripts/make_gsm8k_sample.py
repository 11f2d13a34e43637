"""Write rlsync/data/gsm8k_sample.jsonl: arithmetic word problems in the GSM8K format, with exact answers.

    .venv/bin/python scripts/make_gsm8k_sample.py            # rewrites the shipped sample
    .venv/bin/python scripts/make_gsm8k_sample.py --out x.jsonl --num 500

Each line is `{"question": ..., "answer": ...}`; the answer is a worked
solution whose steps carry GSM8K's `<<expression=value>>` annotations and whose
last line is `#### <number>`, exactly as in `openai/gsm8k`. Every number is
computed here (integers only), so every answer is right. The problems are
generated from a fixed seed: the same command writes the same file
(tests/unit/test_math_task.py checks the shipped file against it).

Why generated, not copied from GSM8K: the sample ships inside the package, so
the math task runs and is tested offline, and it must carry no third-party text.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "rlsync" / "data" / "gsm8k_sample.jsonl"
NAMES = ["Ava", "Ben", "Maya", "Leo", "Nora", "Omar", "Lucy", "Sam", "Iris", "Tom", "Zoe", "Max"]
ITEMS = ["apple", "pencil", "marble", "sticker", "cookie", "stamp", "shell", "card"]


def _adds(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(3, 60), rng.randint(2, 40)
    question = f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?"
    return question, [f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}s."], a + b


def _packs(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 12), rng.randint(3, 12)
    question = f"{name} buys {a} packs of {item}s with {b} {item}s in each pack. How many {item}s is that?"
    return question, [f"That is {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {item}s."], a * b


def _change(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    price, count = rng.randint(2, 15), rng.randint(2, 6)
    paid = price * count + rng.randint(1, 30)
    cost = price * count
    question = (f"A ticket costs ${price}. {name} buys {count} tickets and pays with ${paid}. "
                f"How much change does {name} get?")
    steps = [f"The tickets cost {count} * {price} = $<<{count}*{price}={cost}>>{cost}.",
             f"The change is {paid} - {cost} = $<<{paid}-{cost}={paid - cost}>>{paid - cost}."]
    return question, steps, paid - cost


def _share(rng: random.Random) -> tuple[str, list[str], int]:
    item = rng.choice(ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    total = friends * each
    question = f"{total} {item}s are shared equally among {friends} friends. How many {item}s does each friend get?"
    return question, [f"Each friend gets {total} / {friends} = <<{total}/{friends}={each}>>{each} {item}s."], each


def _weeks(rng: random.Random) -> tuple[str, list[str], int]:
    item = rng.choice(ITEMS)
    per_day, weeks = rng.randint(3, 25), rng.randint(2, 4)
    days = 7 * weeks
    question = f"A shop sells {per_day} {item}s a day. How many {item}s does it sell in {weeks} weeks?"
    steps = [f"{weeks} weeks have {weeks} * 7 = <<{weeks}*7={days}>>{days} days.",
             f"It sells {per_day} * {days} = <<{per_day}*{days}={per_day * days}>>{per_day * days} {item}s."]
    return question, steps, per_day * days


def _twice(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    monday = rng.randint(5, 40)
    question = (f"{name} reads {monday} pages on Monday and twice as many on Tuesday. "
                f"How many pages does {name} read in the two days?")
    steps = [f"On Tuesday {name} reads 2 * {monday} = <<2*{monday}={2 * monday}>>{2 * monday} pages.",
             f"In all that is {monday} + {2 * monday} = <<{monday}+{2 * monday}={3 * monday}>>{3 * monday} pages."]
    return question, steps, 3 * monday


def _walks(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    per_day, days, last = rng.randint(2, 9), rng.randint(3, 6), rng.randint(1, 12)
    question = f"{name} walks {per_day} km a day for {days} days, then {last} km more. How far does {name} walk?"
    walked = per_day * days
    steps = [f"First {name} walks {per_day} * {days} = <<{per_day}*{days}={walked}>>{walked} km.",
             f"In total {walked} + {last} = <<{walked}+{last}={walked + last}>>{walked + last} km."]
    return question, steps, walked + last


def _left(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, given, lost = rng.randint(30, 90), rng.randint(3, 12), rng.randint(2, 9)
    question = f"{name} had {start} {item}s, gave away {given} and lost {lost}. How many {item}s are left?"
    gone = given + lost
    steps = [f"{name} no longer has {given} + {lost} = <<{given}+{lost}={gone}>>{gone} {item}s.",
             f"So {start} - {gone} = <<{start}-{gone}={start - gone}>>{start - gone} are left."]
    return question, steps, start - gone


PROBLEMS = [_adds, _packs, _change, _share, _weeks, _twice, _walks, _left]


def sample(num: int, seed: int = 0) -> list[dict[str, str]]:
    """`num` problems, cycling through every kind, from a fixed seed."""
    rng = random.Random(seed)
    records = []
    for i in range(num):
        question, steps, answer = PROBLEMS[i % len(PROBLEMS)](rng)
        records.append({"question": question, "answer": "\n".join([*steps, f"#### {answer}"])})
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SAMPLE, help=f"file to write (default: {SAMPLE})")
    parser.add_argument("--num", type=int, default=128, help="problems to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for record in sample(args.num, args.seed):
            f.write(json.dumps(record) + "\n")
    print(f"wrote {args.num} problems to {args.out}")


if __name__ == "__main__":
    main()
