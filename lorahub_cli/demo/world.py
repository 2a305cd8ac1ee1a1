"""The demo world: twenty upstream tasks (a miniature Flan) and eight held-out tasks (a miniature BBH).

Every task is a generator `rng -> (input, target)` over small word lists and
numbers, short enough for a byte-level model (inputs under 80 bytes, targets
under 20). Held-out tasks reuse upstream skills under an instruction or an
answer format the base model was never trained on; each declares the upstream
tasks it reuses in `skills`. Two upstream tasks exist only to carry answer
formats (option letters, true/false) that held-out tasks need, as Flan's
multiple-choice templates carry BBH's formats. No task turns on letter case:
the exact-match score lower-cases answers, so a case skill could not be seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import InputError

WORDS = """
apple bread chair dance eagle flame grape horse igloo juice kite lemon mango night ocean piano queen river
snake table uncle voice water yacht zebra brick cloud drum frog glove house ink jelly knife lamp moon nest
olive pearl quilt robot sheep tiger unit vase wheel box yarn zone bell coin desk egg fork goat hill iron jar
king leaf milk nose owl pen ring salt toy van wolf lion bear fish plum rose star tree ship sock rain gold
""".split()
POSITIVE = ["great", "lovely", "superb", "fun", "moving", "bright", "charming", "brilliant"]
NEGATIVE = ["dull", "awful", "boring", "weak", "clumsy", "tedious", "bland", "dreadful"]
SUBJECTS = ["plot", "film", "cast", "music", "story", "ending", "script", "acting"]
ANIMALS = {
    "whale": "mammal",
    "horse": "mammal",
    "bat": "mammal",
    "dog": "mammal",
    "mouse": "mammal",
    "goat": "mammal",
    "eagle": "bird",
    "owl": "bird",
    "duck": "bird",
    "crow": "bird",
    "swan": "bird",
    "robin": "bird",
    "shark": "fish",
    "trout": "fish",
    "tuna": "fish",
    "cod": "fish",
    "carp": "fish",
    "eel": "fish",
    "snake": "reptile",
    "lizard": "reptile",
    "turtle": "reptile",
    "gecko": "reptile",
    "iguana": "reptile",
}
CLASSES = ["mammal", "bird", "fish", "reptile"]
FRUITS = {
    "banana": "yellow",
    "lemon": "yellow",
    "apple": "red",
    "cherry": "red",
    "strawberry": "red",
    "lime": "green",
    "kiwi": "green",
    "pear": "green",
    "plum": "purple",
    "grape": "purple",
    "orange": "orange",
    "apricot": "orange",
    "blueberry": "blue",
}
COLOURS = sorted(set(FRUITS.values()) | {"white", "black", "pink", "brown"})
NOT_COLOURS = ["dog", "chair", "seven", "run", "cloud", "table", "happy", "river", "piano", "spoon"]
ANTONYMS = {
    "hot": "cold",
    "tall": "short",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "full": "empty",
    "strong": "weak",
    "rich": "poor",
    "open": "closed",
    "young": "old",
    "loud": "quiet",
    "hard": "soft",
    "wet": "dry",
    "clean": "dirty",
    "big": "small",
    "up": "down",
    "good": "bad",
}
ANTONYMS.update({v: k for k, v in list(ANTONYMS.items())})


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _options(rng: random.Random, right: str, wrong: str) -> tuple[str, str]:
    """'(A) x (B) y' with the right answer at a random position, and the right letter."""
    if rng.random() < 0.5:
        return f"(A) {right} (B) {wrong}", "(A)"
    return f"(A) {wrong} (B) {right}", "(B)"


def _review(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative"])
    words = POSITIVE if label == "positive" else NEGATIVE
    return f"The {rng.choice(SUBJECTS)} was {rng.choice(words)}.", label


# --- upstream: string skills ----------------------------------------------------------------


def reverse_word(rng):
    w = _word(rng)
    return f"Reverse the letters of the word: {w}", w[::-1]


def spell_dashes(rng):
    w = _word(rng)
    return f"Spell the word with dashes: {w}", "-".join(w)


def first_letter(rng):
    w = _word(rng)
    return f"What is the first letter of the word '{w}'?", w[0]


def last_letter(rng):
    w = _word(rng)
    return f"What is the last letter of the word '{w}'?", w[-1]


def sort_letters(rng):
    w = _word(rng)
    return f"Sort the letters of '{w}' in alphabetical order.", "".join(sorted(w))


def dedupe_letters(rng):
    w = rng.choice([w for w in WORDS if len(set(w)) < len(w)] if rng.random() < 0.7 else WORDS)
    return f"Remove the repeated letters from: {w}", "".join(dict.fromkeys(w))


def count_letters(rng):
    w = _word(rng)
    return f"How many letters does '{w}' have?", str(len(w))


def contains_letter(rng):
    w = _word(rng)
    letter = rng.choice(w) if rng.random() < 0.5 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return f"Does the word '{w}' contain the letter {letter}? Answer yes or no.", "yes" if letter in w else "no"


# --- upstream: arithmetic ---------------------------------------------------------------------


def add_single(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} plus {b}?", str(a + b)


def add_double(rng):
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"Add {a} and {b}.", str(a + b)


def subtract(rng):
    a = rng.randint(5, 20)
    b = rng.randint(0, a)
    return f"Subtract {b} from {a}.", str(a - b)


def compare_numbers(rng):
    a, b = rng.sample(range(100), 2)
    return f"Which number is larger, {a} or {b}?", str(max(a, b))


def parity(rng):
    n = rng.randint(0, 99)
    return f"Is {n} an even or an odd number?", "even" if n % 2 == 0 else "odd"


def next_number(rng):
    n = rng.randint(0, 98)
    return f"What number comes right after {n}?", str(n + 1)


# --- upstream: word knowledge -------------------------------------------------------------------


def sentiment(rng):
    text, label = _review(rng)
    return f"Review: {text} Is this review positive or negative?", label


def animal_class(rng):
    animal = rng.choice(sorted(ANIMALS))
    return f"Is a {animal} a mammal, bird, fish or reptile?", ANIMALS[animal]


def fruit_colour(rng):
    fruit = rng.choice(sorted(FRUITS))
    return f"What colour is a ripe {fruit}?", FRUITS[fruit]


def antonym(rng):
    word = rng.choice(sorted(ANTONYMS))
    return f"Give the opposite of the word '{word}'.", ANTONYMS[word]


# --- upstream: answer formats -----------------------------------------------------------------


def colour_option(rng):
    options, letter = _options(rng, rng.choice(COLOURS), rng.choice(NOT_COLOURS))
    return f"Which one is a colour? {options}", letter


def true_false_greater(rng):
    a, b = rng.sample(range(10), 2)
    return f"True or false: {a} is greater than {b}.", "true" if a > b else "false"


# --- held-out: upstream skills under new instructions or answer formats --------------------------


def backwards_dashes(rng):
    w = _word(rng)
    return f"Spell it backwards, letters joined by dashes: {w}", "-".join(w[::-1])


def first_and_last(rng):
    w = _word(rng)
    return f"Write the first and the last letter of '{w}' together.", w[0] + w[-1]


def parity_true_false(rng):
    n = rng.randint(0, 99)
    claim = rng.choice(["even", "odd"])
    return f"True or false: {n} is an {claim} number.", "true" if (n % 2 == 0) == (claim == "even") else "false"


def larger_option(rng):
    a, b = rng.sample(range(100), 2)
    options, letter = _options(rng, str(max(a, b)), str(min(a, b)))
    return f"Pick the larger number. {options}", letter


def sentiment_option(rng):
    text, label = _review(rng)
    options, letter = _options(rng, label, "negative" if label == "positive" else "positive")
    return f"{text} The tone is: {options}", letter


def animal_true_false(rng):
    animal = rng.choice(sorted(ANIMALS))
    claim = ANIMALS[animal] if rng.random() < 0.5 else rng.choice([c for c in CLASSES if c != ANIMALS[animal]])
    return f"True or false: the {animal} is a {claim}.", "true" if claim == ANIMALS[animal] else "false"


def sum_parity(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"Is the sum of {a} and {b} even or odd?", "even" if (a + b) % 2 == 0 else "odd"


def fruit_colour_option(rng):
    fruit = rng.choice(sorted(FRUITS))
    options, letter = _options(rng, FRUITS[fruit], rng.choice([c for c in COLOURS if c != FRUITS[fruit]]))
    return f"A ripe {fruit} is which colour? {options}", letter


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "upstream" or "held-out"
    description: str
    generator: Callable[[random.Random], tuple[str, str]] = field(repr=False, compare=False)
    skills: tuple[str, ...] = ()  # held-out only: the upstream tasks whose skills it reuses
    new: str = ""  # held-out only: what the base model has not seen

    def metadata(self) -> dict:
        meta = {"name": self.name, "kind": self.kind, "description": self.description}
        if self.kind == "held-out":
            meta.update(skills=list(self.skills), new=self.new)
        return meta


def _up(generator, description: str) -> Task:
    return Task(generator.__name__, "upstream", description, generator)


def _held(generator, description: str, skills: tuple[str, ...], new: str) -> Task:
    return Task(generator.__name__, "held-out", description, generator, skills, new)


UPSTREAM = (
    _up(reverse_word, "reverse a word"),
    _up(spell_dashes, "spell a word with dashes between letters"),
    _up(first_letter, "first letter of a word"),
    _up(last_letter, "last letter of a word"),
    _up(sort_letters, "sort a word's letters"),
    _up(dedupe_letters, "drop repeated letters, keeping first occurrences"),
    _up(count_letters, "count a word's letters"),
    _up(contains_letter, "does a word contain a letter (yes/no)"),
    _up(add_single, "add two digits"),
    _up(add_double, "add two two-digit numbers"),
    _up(subtract, "subtract small numbers"),
    _up(compare_numbers, "the larger of two numbers"),
    _up(parity, "is a number even or odd"),
    _up(next_number, "the successor of a number"),
    _up(sentiment, "is a one-sentence review positive or negative"),
    _up(animal_class, "mammal, bird, fish or reptile"),
    _up(fruit_colour, "the colour of a fruit"),
    _up(antonym, "the opposite of a word"),
    _up(colour_option, "pick the colour among two options, answering (A) or (B)"),
    _up(true_false_greater, "is one digit greater than another, answering true or false"),
)
HELD_OUT = (
    _held(
        backwards_dashes,
        "a word reversed and spelled with dashes",
        ("reverse_word", "spell_dashes"),
        "two skills chained in one answer; unseen instruction",
    ),
    _held(
        first_and_last,
        "first and last letter of a word, joined",
        ("first_letter", "last_letter"),
        "two answers joined in one; unseen instruction",
    ),
    _held(
        parity_true_false,
        "judge a parity claim",
        ("parity", "true_false_greater"),
        "parity answered true/false instead of even/odd",
    ),
    _held(
        larger_option,
        "the larger number as an option letter",
        ("compare_numbers", "colour_option"),
        "comparison answered (A)/(B) instead of the number",
    ),
    _held(
        sentiment_option,
        "a review's tone as an option letter",
        ("sentiment", "colour_option"),
        "sentiment answered (A)/(B); the question wording is new",
    ),
    _held(
        animal_true_false,
        "judge an animal-class claim",
        ("animal_class", "true_false_greater"),
        "animal class answered true/false",
    ),
    _held(
        sum_parity, "parity of a sum of two digits", ("add_single", "parity"), "two skills chained; unseen instruction"
    ),
    _held(
        fruit_colour_option,
        "a fruit's colour as an option letter",
        ("fruit_colour", "colour_option"),
        "fruit colour answered (A)/(B)",
    ),
)
TASKS = {t.name: t for t in UPSTREAM + HELD_OUT}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise InputError(f"task '{name}' is not in the demo world.", f"Choose one of: {', '.join(TASKS)}.")
    return TASKS[name]


def generate(name: str, n: int, seed: int, split: str = "train") -> list[dict]:
    """`n` examples of a task as {"input", "target"} rows; the same arguments give the same rows.

    Splits are independent draws, so they can share an example where the task has few distinct ones.
    """
    rng = random.Random(f"{name}:{split}:{seed}")
    task = get_task(name)
    return [dict(zip(("input", "target"), task.generator(rng))) for _ in range(n)]
