"""Write vector_search's corpus: 300 short encyclopedia entries about an invented country.

Why invented: the corpus ships in the repository, so it must be small, free of licences and
stable; and retrieval tests need documents whose words set them apart (a query built from one
entry must find that entry). Every entry names things no other entry is about (a town, a
river, a dish...), drawn from a seeded generator, and many mention each other, as an
encyclopedia does.

Run `python deploy/triton/model_repository/vector_search/make_corpus.py` to write
`1/corpus.jsonl` again: the same seed gives the same file, byte for byte (a test checks).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 2024
CORPUS = Path(__file__).resolve().parent / "1" / "corpus.jsonl"
PER_KIND = 30  # ten kinds of entry: 300 documents

ONSETS = (
    "b",
    "br",
    "c",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "w",
    "z",
    "sh",
    "th",
    "ch",
    "qu",
)
VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "ar", "or", "el")
CODAS = ("", "n", "r", "l", "s", "th", "m", "nd", "rk", "sh", "x", "ck")

DIRECTIONS = ("northern", "southern", "eastern", "western")
CRAFTS = (
    "glass blowing",
    "rope making",
    "clock making",
    "paper mills",
    "silver work",
    "boat building",
    "wool dyeing",
    "bell casting",
    "salt pans",
    "printing presses",
)
EVENTS = (
    "lantern fair",
    "horse market",
    "river regatta",
    "harvest dance",
    "book fair",
    "kite festival",
    "cheese market",
    "choir contest",
    "ice race",
    "flower parade",
)
SEASONS = ("spring", "summer", "autumn", "winter")
CROPS = ("barley", "pear", "hop", "flax", "plum", "rye", "cherry", "walnut", "olive", "turnip")
ANIMALS = ("goat", "otter", "heron", "elk", "trout", "beaver", "crane", "boar", "pike", "lynx")
JOBS = (
    "engineer",
    "cartographer",
    "composer",
    "astronomer",
    "chemist",
    "architect",
    "botanist",
    "printer",
    "physician",
    "navigator",
)
FEATS = (
    "built the first steam pump",
    "mapped the coast",
    "wrote the national anthem",
    "catalogued the comets",
    "discovered a blue dye",
    "designed the old bridge",
    "bred a frost-proof apple",
    "printed the first newspaper",
    "founded the hospital",
    "charted the winter currents",
)
INGREDIENTS = (
    "smoked fish",
    "sour cream",
    "dill",
    "chestnuts",
    "honey",
    "lentils",
    "goat cheese",
    "mushrooms",
    "juniper",
    "beets",
    "apples",
    "millet",
)
MATERIALS = ("oak", "maple", "bone", "brass", "spruce", "cane", "horn", "copper")
COLOURS = ("crimson", "amber", "slate", "emerald", "ivory", "cobalt", "ochre", "violet")
TRADES = ("timber", "salt", "grain", "wool", "copper", "amber", "wine", "furs")
SPORTS = ("football", "rowing", "wrestling", "archery", "fencing", "cycling")


class Names:
    """Invented, pronounceable names, each used once in the whole corpus."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def __call__(self, syllables: int = 2) -> str:
        while True:
            parts = [self._rng.choice(ONSETS) + self._rng.choice(VOWELS) for _ in range(syllables)]
            name = ("".join(parts) + self._rng.choice(CODAS)).capitalize()
            if name not in self._used and len(name) > 3:
                self._used.add(name)
                return name


def build(seed: int = SEED) -> list[dict[str, str]]:
    """Every document, in id order: {"id", "title", "text"}."""
    rng = random.Random(seed)
    name = Names(rng)
    seas = [name(2) for _ in range(6)]
    hills = [name(2) for _ in range(12)]
    rivers = [name(2) for _ in range(PER_KIND)]
    towns = [name(2) for _ in range(PER_KIND)]
    docs: list[tuple[str, str]] = []

    def pick(options: tuple[str, ...] | list[str]) -> str:
        return rng.choice(options)

    for town in towns:
        docs.append(
            (
                town,
                f"{town} is a town on the {pick(DIRECTIONS)} bank of the {pick(rivers)} river,"
                f" known for its {pick(CRAFTS)} and its {pick(SEASONS)} {pick(EVENTS)}. About"
                f" {rng.randrange(2, 90) * 1000} people live there, and its old harbour once"
                f" shipped {pick(TRADES)} to the {pick(seas)} sea.",
            )
        )
    for river in rivers:
        docs.append(
            (
                f"The {river} river",
                f"The {river} river rises in the {pick(hills)} hills and flows"
                f" {rng.randrange(40, 900)} kilometres to the {pick(seas)} sea, passing"
                f" {pick(towns)}. Its valley is famous for {pick(CROPS)} orchards and"
                f" {pick(ANIMALS)} colonies along the reed banks.",
            )
        )
    for _ in range(PER_KIND):
        person = f"{name(2)} {name(3)}"
        docs.append(
            (
                person,
                f"{person} was a {pick(JOBS)} born in {pick(towns)} in"
                f" {rng.randrange(1700, 1960)}, who {pick(FEATS)}. A street in"
                f" {pick(towns)} and a {pick(COLOURS)} rose are named after"
                f" {pick(('him', 'her'))}.",
            )
        )
    for _ in range(PER_KIND):
        dish = name(3)
        first, second, third = rng.sample(INGREDIENTS, 3)
        docs.append(
            (
                dish,
                f"{dish} is a dish from {pick(towns)} made of {first}, {second} and {third},"
                f" slowly baked in a clay pot and served at the {pick(EVENTS)} with"
                f" {pick(CROPS)} bread.",
            )
        )
    for _ in range(PER_KIND):
        instrument = name(2)
        docs.append(
            (
                f"The {instrument}",
                f"The {instrument} is a folk instrument carved from {pick(MATERIALS)} with"
                f" {rng.randrange(3, 24)} strings, played with a {pick(MATERIALS)} bow in the"
                f" valleys around {pick(towns)}; its sound is said to imitate the"
                f" {pick(ANIMALS)}.",
            )
        )
    for _ in range(PER_KIND):
        festival = name(2)
        docs.append(
            (
                f"The {festival} festival",
                f"The {festival} festival is held every {pick(SEASONS)} in {pick(towns)}:"
                f" people wear {pick(COLOURS)} masks, float candles on the {pick(rivers)}"
                f" river and eat {pick(INGREDIENTS)} until dawn.",
            )
        )
    for _ in range(PER_KIND):
        ship = name(2)
        docs.append(
            (
                f"The {ship}",
                f"The {ship} was a {pick(MATERIALS)}-hulled ship launched at {pick(towns)} in"
                f" {rng.randrange(1650, 1930)}. She carried {pick(TRADES)} across the"
                f" {pick(seas)} sea for {rng.randrange(5, 60)} years before she sank in a"
                f" {pick(SEASONS)} storm.",
            )
        )
    for _ in range(PER_KIND):
        bird = name(2)
        docs.append(
            (
                f"The {bird.lower()} bird",
                f"The {bird.lower()} is a {pick(COLOURS)} bird that nests in the {pick(hills)}"
                f" hills and winters on the {pick(rivers)} river; it feeds on {pick(CROPS)}"
                f" seeds and sings before {pick(('rain', 'snow', 'sunrise', 'thunder'))}.",
            )
        )
    for _ in range(PER_KIND):
        club = name(2)
        docs.append(
            (
                f"{club} sporting club",
                f"{club} is a {pick(SPORTS)} club from {pick(towns)}, founded in"
                f" {rng.randrange(1850, 1990)}, whose players wear {pick(COLOURS)} shirts; it"
                f" has won the national cup {rng.randrange(1, 19)} times.",
            )
        )
    for _ in range(PER_KIND):
        machine = name(3)
        docs.append(
            (
                f"The {machine} engine",
                f"The {machine} engine is a {pick(('water', 'wind', 'steam', 'clockwork'))}"
                f" machine invented in {pick(towns)} to drive its {pick(CRAFTS)}; it turns"
                f" {rng.randrange(10, 400)} times a minute and needs a {pick(MATERIALS)}"
                " shaft replaced every year.",
            )
        )
    return [
        {"id": f"doc-{index:03d}", "title": title, "text": text}
        for index, (title, text) in enumerate(docs, start=1)
    ]


def render(docs: list[dict[str, str]]) -> str:
    """The corpus file: one JSON object per line."""
    return "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)


if __name__ == "__main__":
    CORPUS.write_text(render(build()))
    print(f"wrote {CORPUS} ({len(build())} documents)", file=sys.stderr)
