"""Generate the example knapsack inputs into examples/inputs/ (deterministic, < 3 s).

    python examples/make_inputs.py [--out DIR]

Small inputs (inline transport) and one above 5 MiB of compact JSON (upload
transport; its solution is above 5 MiB too, so the output comes by URL).
The big one is big because of long item descriptions, not item count, so the
app solves it in about a second.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = [
    "steel",
    "crate",
    "pallet",
    "drum",
    "carton",
    "fragile",
    "frozen",
    "bulk",
    "spare",
    "valve",
    "pump",
    "sensor",
    "cable",
    "motor",
    "gear",
    "filter",
    "panel",
    "battery",
    "lamp",
    "brake",
    "hose",
    "tire",
    "bolt",
    "kit",
    "module",
]
SMALL = (("small-01", 12, 50), ("small-02", 25, 120), ("small-03", 40, 300), ("small-04", 60, 500))
BIG_ITEMS = 4500
BIG_DESCRIPTION_WORDS = 230


def item(rng: random.Random, i: int, words: int) -> dict[str, object]:
    it: dict[str, object] = {
        "id": f"item-{i:05d}",
        "value": rng.randint(1, 100),
        "weight": rng.randint(1, 60),
    }
    if words:
        it["description"] = " ".join(rng.choice(WORDS) for _ in range(words))
        it["tags"] = sorted({rng.choice(WORDS) for _ in range(6)})
    return it


def write(path: Path, data: dict[str, object]) -> int:
    text = json.dumps(data, separators=(",", ":"))
    path.write_text(text + "\n")
    return len(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "inputs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20240611)
    for name, n, capacity in SMALL:
        data = {"items": [item(rng, i, 0) for i in range(n)], "weight_capacity": capacity}
        size = write(args.out / f"{name}.json", data)
        print(f"{args.out / (name + '.json')}: {n} items, {size} bytes")
    big = {
        "items": [item(rng, i, BIG_DESCRIPTION_WORDS) for i in range(BIG_ITEMS)],
        "weight_capacity": BIG_ITEMS * 26,
    }
    size = write(args.out / "big-01.json", big)
    print(f"{args.out / 'big-01.json'}: {BIG_ITEMS} items, {size} bytes")


if __name__ == "__main__":
    main()
