"""Training captions for the miniature text-to-image model.

This generator is used only for training. The evaluation prompts come from a separate generator
(``benchmark.mini.make_prompts``) with its own sentence templates, arithmetic operand pairs,
relational phrasings, cultural hints, misspellings and filler words. The benchmark thus measures
how far the pretrained text encoder carries a concept to phrasings the UNet never saw.

A caption for digit ``d`` combines one *surface form* of ``d`` (numeral, English word, a word in
another language, an arithmetic expression, a relational phrase, a cultural hint or a misspelling)
with a sentence template and optional filler words, then applies a random letter case.
"""

from __future__ import annotations

import random
from functools import lru_cache

ENGLISH_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)

# Number words in German, French, Spanish, Italian, Portuguese and Dutch.
FOREIGN_WORDS: dict[int, tuple[str, ...]] = {
    0: ("null", "zéro", "cero", "zero", "nul"),
    1: ("eins", "un", "uno", "um", "een"),
    2: ("zwei", "deux", "dos", "due", "dois", "twee"),
    3: ("drei", "trois", "tres", "tre", "três", "drie"),
    4: ("vier", "quatre", "cuatro", "quattro", "quatro"),
    5: ("fünf", "cinq", "cinco", "cinque", "vijf"),
    6: ("sechs", "six", "seis", "sei", "zes"),
    7: ("sieben", "sept", "siete", "sette", "sete", "zeven"),
    8: ("acht", "huit", "ocho", "otto", "oito"),
    9: ("neun", "neuf", "nueve", "nove", "negen"),
}

MISSPELLINGS: dict[int, tuple[str, ...]] = {
    0: ("zer0", "zeroo", "zreo"),
    1: ("onee", "oen", "wun"),
    2: ("tow", "twoo", "tw0"),
    3: ("thre", "tree", "threee"),
    4: ("fuor", "foor", "fore"),
    5: ("fiv", "fivve", "fve"),
    6: ("sixx", "sicks", "siix"),
    7: ("sevn", "sevem", "seveen", "sven"),
    8: ("eigth", "eihgt", "ate"),
    9: ("nien", "nin", "nyne"),
}

CULTURAL_HINTS: dict[int, tuple[str, ...]] = {
    0: ("the number of nothing", "a big round nought"),
    1: ("the loneliest number", "first place"),
    2: ("a pair", "the number of a couple"),
    3: ("a trio", "the number of little pigs"),
    4: ("the number of seasons", "a quartet"),
    5: ("the number of fingers on a hand", "a high five number"),
    6: ("half a dozen", "the number of sides of a hexagon"),
    7: ("the number of days in a week", "the lucky number", "the seven seas", "agent 007",
        "the number of dwarfs", "the number of wonders of the world"),
    8: ("the number of legs of a spider", "an octet"),
    9: ("the number of planets long ago", "cloud nine"),
}

TEMPLATES: tuple[str, ...] = (
    "{form}",
    "the digit {form}",
    "a handwritten {form}",
    "handwritten digit {form}",
    "the number {form}",
    "a drawing of the number {form}",
    "digit: {form}",
    "{form}, handwritten",
    "an image of {form}",
    "write {form}",
)

PREFIXES: tuple[str, ...] = (
    "", "", "", "a photo of ", "an image of ", "a picture of ", "ink on paper, ",
    "pencil sketch of ", "a small ", "a white ",
)

SUFFIXES: tuple[str, ...] = (
    "", "", "", ", high quality", ", trending", ", high quality, trending", ", ink on paper",
    ", black background", ", 8k", ", detailed",
)

RELATION_TEMPLATES: tuple[str, ...] = (
    "the number after {previous}",
    "one less than {next}",
    "one more than {previous}",
)


def _arithmetic_pair_is_training(a: int, b: int, operation: str) -> bool:
    """Return whether the operand pair (a, b) of ``operation`` belongs to the training captions.

    A fixed pseudo-random partition (seeded by the pair and the operation) keeps about 30% of the
    pairs for the evaluation prompts.
    """
    return random.Random(f"{operation}:{a}:{b}").random() >= 0.3


@lru_cache(maxsize=None)
def arithmetic_expressions(digit: int, training: bool) -> tuple[str, ...]:
    """Return the arithmetic expressions equal to ``digit`` on the training or evaluation side.

    Covers sums and differences with operands up to 20 and products and quotients up to 30.
    ``training`` selects the side of the fixed operand-pair partition, so the two sides share no
    operand pair in the same operation.
    """
    plus_words = ("+", "plus") if training else ("+", "and")
    minus_words = ("-", "minus") if training else ("-", "take away")
    times_words = ("*", "times") if training else ("x", "multiplied by")
    divide_words = ("/", "divided by") if training else ("÷", "over")
    expressions: list[str] = []
    for a in range(0, 31):
        for b in range(0, 21):
            candidates = (
                ("+", a + b == digit and a <= 20, plus_words),
                ("-", a - b == digit and a <= 20, minus_words),
                ("*", 1 < a and 1 < b and a * b == digit, times_words),
                ("/", 1 < b and a == digit * b, divide_words),
            )
            for operation, equals_digit, words in candidates:
                if equals_digit and _arithmetic_pair_is_training(a, b, operation) == training:
                    expressions += [f"{a} {word} {b}" for word in words]
    return tuple(expressions)


@lru_cache(maxsize=None)
def surface_forms(digit: int) -> dict[str, tuple[str, ...]]:
    """Return the training surface forms of ``digit``, grouped by kind (cached: do not mutate)."""
    relations = []
    for template in RELATION_TEMPLATES:
        needs_previous = "{previous}" in template
        if needs_previous and digit == 0:
            continue
        if not needs_previous and digit == 9:
            continue
        relations.append(
            template.format(
                previous=ENGLISH_WORDS[digit - 1] if digit > 0 else "",
                next=ENGLISH_WORDS[digit + 1] if digit < 9 else "",
            )
        )
    return {
        "numeral": (str(digit),),
        "english": (ENGLISH_WORDS[digit],),
        "foreign": FOREIGN_WORDS[digit],
        "arithmetic": arithmetic_expressions(digit, training=True),
        "relation": tuple(relations),
        "cultural": CULTURAL_HINTS[digit],
        "misspelling": MISSPELLINGS[digit],
    }


# Probability of each kind of surface form. Numerals and English words dominate.
FORM_WEIGHTS: dict[str, float] = {
    "numeral": 0.3,
    "english": 0.25,
    "foreign": 0.15,
    "arithmetic": 0.1,
    "relation": 0.06,
    "cultural": 0.06,
    "misspelling": 0.08,
}


def _apply_random_case(text: str, rng: random.Random) -> str:
    choice = rng.random()
    if choice < 0.7:
        return text
    if choice < 0.8:
        return text.upper()
    if choice < 0.9:
        return text.title()
    return text.capitalize()


def training_caption(digit: int, rng: random.Random) -> str:
    """Draw one training caption for ``digit`` (0–9) using ``rng``."""
    if not 0 <= digit <= 9:
        raise ValueError(f"Invalid digit {digit}: expected an integer in 0..9.")
    forms = surface_forms(digit)
    kinds = [kind for kind in FORM_WEIGHTS if forms[kind]]
    kind = rng.choices(kinds, weights=[FORM_WEIGHTS[k] for k in kinds])[0]
    form = rng.choice(forms[kind])
    template = "{form}" if kind in ("cultural", "relation") and rng.random() < 0.5 else rng.choice(TEMPLATES)
    caption = rng.choice(PREFIXES) + template.format(form=form) + rng.choice(SUFFIXES)
    return _apply_random_case(caption.strip(), rng)


def training_caption_pool(captions_per_digit: int, seed: int) -> tuple[list[str], list[int]]:
    """Return a deterministic pool of distinct training captions and their digits.

    Args:
        captions_per_digit: number of distinct captions drawn for each digit.
        seed: seed of the random generator.

    Returns:
        ``(captions, digits)``: two lists of length ``10 * captions_per_digit``, digit-major order.
    """
    rng = random.Random(seed)
    captions: list[str] = []
    digits: list[int] = []
    for digit in range(10):
        seen: set[str] = set()
        attempts = 0
        while len(seen) < captions_per_digit:
            attempts += 1
            if attempts > 200 * captions_per_digit:
                raise RuntimeError(
                    f"Only {len(seen)} distinct captions for digit {digit}; "
                    f"request fewer than {captions_per_digit} per digit."
                )
            seen.add(training_caption(digit, rng))
        ordered = sorted(seen)
        captions += ordered
        digits += [digit] * len(ordered)
    return captions, digits
