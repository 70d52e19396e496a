"""Generate src/lynxpipe/data/corpus.txt: a few hundred KB of English-like text, written here.

Deterministic (fixed seed), no downloads: sentences drawn from a small hand-written grammar
about rivers, workshops, ships and weather. The text is ours (public domain); it exists so
`lynxpipe train --data corpus` has natural-language bytes with structure worth learning.

    python tools/make_corpus.py            # rewrites the shipped file
"""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "lynxpipe" / "data" / "corpus.txt"
TARGET_BYTES = 320_000

NAMES = ["Ada", "Bram", "Cora", "Dov", "Elin", "Fenn", "Greta", "Hal", "Ines", "Jory", "Kasia",
         "Lio", "Mara", "Nils", "Odile", "Pim", "Quinn", "Rosa", "Sven", "Tova", "Ulla", "Vik"]
PLACES = ["the harbour", "the mill", "the old bridge", "the orchard", "the lighthouse",
          "the market square", "the workshop", "the river bend", "the library", "the quarry",
          "the north field", "the ferry landing", "the bakery", "the weir", "the hill farm"]
THINGS = ["a lantern", "the nets", "a wooden box", "the ledger", "a coil of rope", "the map",
          "a basket of apples", "the anchor chain", "a brass compass", "the spare sail",
          "a jar of honey", "the tide tables", "a pair of oars", "the letters", "a clay pot"]
ADJ = ["quiet", "grey", "bright", "narrow", "heavy", "patient", "careful", "cold", "warm",
       "early", "late", "slow", "steady", "crooked", "open", "distant", "familiar", "small"]
VERBS_T = ["carried", "mended", "counted", "painted", "lifted", "weighed", "folded", "studied",
           "sold", "hid", "found", "checked", "tied", "cleaned", "packed", "traded"]
VERBS_I = ["waited", "listened", "walked on", "laughed", "rested", "worked late", "hurried",
           "kept watch", "sang softly", "turned back", "looked around", "stood still"]
WEATHER = ["the wind rose from the west", "rain drummed on the roofs", "fog lay on the water",
           "the sun came through thin cloud", "frost silvered the fences",
           "a warm breeze moved the reeds", "snow settled on the hills",
           "the tide ran out across the flats", "thunder rolled far off"]
TIMES = ["At dawn", "By noon", "In the evening", "Late at night", "Before the market opened",
         "After the storm", "On the first day of spring", "When the bells rang",
         "Some weeks later", "That autumn"]
LINKS = ["and", "but", "so", "while", "because", "although"]
SAYINGS = ["Measure twice and cut once.", "A calm sea never made a skilled sailor.",
           "Many hands make light work.", "The river does not hurry, yet it arrives.",
           "Mend the roof while the sun shines.", "Count the nets before the boats go out."]


def sentence(rng: random.Random) -> str:
    who, other = rng.sample(NAMES, 2)
    pick = rng.randrange(7)
    if pick == 0:
        return (f"{rng.choice(TIMES)}, {who} {rng.choice(VERBS_T)} {rng.choice(THINGS)} to "
                f"{rng.choice(PLACES)}.")
    if pick == 1:
        return (f"{who} {rng.choice(VERBS_I)} {rng.choice(LINKS)} {other} "
                f"{rng.choice(VERBS_T)} {rng.choice(THINGS)}.")
    if pick == 2:
        return (f"{rng.choice(TIMES)} {rng.choice(WEATHER)}, and {rng.choice(PLACES)} was "
                f"{rng.choice(ADJ)}.")
    if pick == 3:
        n = rng.randint(2, 40)
        return (f"{who} counted {n} boats near {rng.choice(PLACES)} and wrote the number in "
                f"the ledger.")
    if pick == 4:
        return f'"{rng.choice(SAYINGS)}" said {who} to {other}.'
    if pick == 5:
        return (f"The {rng.choice(ADJ)} road to {rng.choice(PLACES)} was {rng.choice(ADJ)}, "
                f"{rng.choice(LINKS)} {who} {rng.choice(VERBS_I)}.")
    return (f"{who} asked {other} where {rng.choice(THINGS)} had gone, and {other} pointed to "
            f"{rng.choice(PLACES)}.")


def main() -> None:
    rng = random.Random(20261122)
    parts, size, chapter = [], 0, 1
    while size < TARGET_BYTES:
        if rng.random() < 0.04:
            head = f"\nChapter {chapter}\n\n"
            chapter += 1
            parts.append(head)
            size += len(head)
        para = " ".join(sentence(rng) for _ in range(rng.randint(3, 8)))
        text = textwrap.fill(para, width=88) + "\n\n"
        parts.append(text)
        size += len(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(parts), encoding="ascii")
    print(f"wrote {OUT} ({size} bytes)")


if __name__ == "__main__":
    main()
