"""The demo world: a general mixture for the base model, skills for the modules, held-out tasks that reuse them.

Three kinds of task, all generators `rng -> (input, target)` over a word list and small numbers:

- general (the base model's instruction tuning, a miniature Flan mixture without the skills): copying,
  answer formats (brackets, stars, twice), first/last letter, picking a word, each under many
  instruction paraphrases, and the same tasks as few-shot prompts in `eval.methods.icl_prompt`'s
  format, so that in-context learning is a fair baseline;
- upstream (one LoRA each): a skill the base model never trained on (reverse a word, drop its vowels,
  add two digits, ...), under four paraphrases of its instruction;
- held-out (the miniature BBH): each needs one or two upstream skills, under an instruction wording
  no training run saw (`wording`), in an answer format the base knows but never saw with that skill
  (`format`), as a mixture of examples of two or three skills under one new instruction, told apart
  by the surface of their inputs (`mixed`), or two skills chained in one answer (`chained`, the
  documented limitation).

Answers are open (most frequent answer under 15% on every held-out task): nothing is solved by
guessing a label. No task turns on letter case or on '.', which the exact-match score removes.
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
train plant stone sugar paper glass bird candy dream earth fruit ghost heart light metal north party radio
smile sound space storm sweet thumb tooth watch world young brush crown field grass honey magic mouse
""".split()
VOWELS = frozenset("aeiou")
ICL_SHOTS = (1, 5)  # shots per few-shot prompt of the general mixture: the evaluation uses 5


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random) -> str:
    """A real word or, as often, a random string of 3 to 6 letters: a model that copies letters, not words."""
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def _word_or_number(rng: random.Random) -> str:
    return _word(rng) if rng.random() < 0.6 else str(rng.randint(0, 99))


def icl_prompt(solved: list[tuple[str, str]], question: str) -> str:
    """The prompt `eval.methods.icl_prompt` builds (tested to agree): solved examples, then the question."""
    return "".join(f"{q}\nAnswer: {a}\n\n" for q, a in solved) + f"{question}\nAnswer:"


# --- answers: each returns the template slots and the target -------------------------------------


def copy_any(rng):
    x = _word_or_number(rng)
    return {"x": x}, x


def bracketed(rng):
    x = _word_or_number(rng)
    return {"x": x}, f"[{x}]"


def starred(rng):
    x = _word_or_number(rng)
    return {"x": x}, f"*{x}*"


def twice(rng):
    x = _word_or_number(rng)
    return {"x": x}, f"{x} {x}"


def first_of(rng):
    w = _word(rng)
    return {"x": w}, w[0]


def last_of(rng):
    w = _word(rng)
    return {"x": w}, w[-1]


def pick_word(rng):
    a, b = _word(rng), _word(rng)
    which = rng.randint(0, 1)
    return {"a": a, "b": b, "k": ("first", "second")[which]}, (a, b)[which]


def reversed_word(rng):
    w = _word(rng)
    return {"x": w}, w[::-1]


def without_vowels(rng):
    w = _word(rng)
    while not set(w) - VOWELS:
        w = _word(rng)
    return {"x": w}, "".join(c for c in w if c not in VOWELS)


def doubled_letters(rng):
    w = _word(rng)
    return {"x": w}, "".join(c + c for c in w)


def swapped_ends(rng):
    w = _word(rng)
    while w[0] == w[-1]:
        w = _word(rng)
    return {"x": w}, w[-1] + w[1:-1] + w[0]


def rotated(rng):
    w = _word(rng)
    return {"x": w}, w[1:] + w[0]


def beheaded(rng):
    w = _word(rng)
    return {"x": w}, w[1:]


def letter_count(rng):
    w = _word(rng)
    return {"x": w}, str(len(w))


def digit_product(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"a": a, "b": b}, str(a * b)


def predecessor(rng):
    n = rng.randint(1, 99)
    return {"n": n}, str(n - 1)


def digit_sum(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"a": a, "b": b}, str(a + b)


def successor(rng):
    n = rng.randint(0, 98)
    return {"n": n}, str(n + 1)


def doubled_number(rng):
    n = rng.randint(0, 49)
    return {"n": n}, str(2 * n)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "general", "upstream" or "held-out"
    description: str
    answer: Callable[[random.Random], tuple[dict, str]] = field(repr=False, compare=False)
    templates: tuple[str, ...] = ()
    skills: tuple[str, ...] = ()  # held-out only: the upstream tasks whose skills it needs
    type: str = ""  # held-out only: wording, format, mixed or chained
    new: str = ""  # held-out only: what no training run saw
    parts: tuple[Task, ...] = field(default=(), repr=False, compare=False)  # mixed: the tasks it draws from

    def sample(self, rng: random.Random) -> tuple[str, str]:
        if self.parts:
            return rng.choice(self.parts).sample(rng)
        slots, target = self.answer(rng)
        return rng.choice(self.templates).format(**slots), target

    def metadata(self) -> dict:
        meta = {"name": self.name, "kind": self.kind, "description": self.description}
        if self.kind == "upstream":
            meta["templates"] = list(self.templates)
        if self.kind == "held-out":
            meta.update(type=self.type, skills=list(self.skills), new=self.new)
        return meta


def _general(name, answer, description, *templates) -> Task:
    return Task(name, "general", description, answer, templates)


def _up(name, answer, description, *templates) -> Task:
    return Task(name, "upstream", description, answer, templates)


def _held(name, answer, description, skills, type_, new, *templates, parts=()) -> Task:
    return Task(name, "held-out", description, answer, templates, tuple(skills), type_, new, tuple(parts))


def _wrap(answer, left: str, right: str):
    def wrapped(rng):
        slots, target = answer(rng)
        return slots, f"{left}{target}{right}"

    return wrapped


def _chain(answer, then: Callable[[str], str]):
    def chained(rng):
        slots, target = answer(rng)
        return slots, then(target)

    return chained


GENERAL = (
    _general(
        "copy",
        copy_any,
        "repeat a word or number",
        "Repeat the word: {x}",
        "Say {x} again.",
        "Write {x}.",
        "Echo: {x}",
        "Copy this: {x}",
        "Return {x} unchanged.",
        "Give back {x}.",
        "{x}",
    ),
    _general(
        "brackets",
        bracketed,
        "a word or number in square brackets",
        "Put {x} in brackets.",
        "Write {x} inside square brackets.",
        "Wrap in brackets: {x}",
        "Answer in brackets: {x}",
    ),
    _general(
        "stars",
        starred,
        "a word or number between two stars",
        "Put stars around {x}.",
        "Write {x} between two stars.",
        "Wrap in stars: {x}",
    ),
    _general("twice", twice, "a word or number written twice", "Write {x} twice.", "Say {x} two times."),
    _general(
        "first_letter",
        first_of,
        "the first letter of a word",
        "What is the first letter of {x}?",
        "First letter of the word: {x}",
        "Give the initial of {x}.",
    ),
    _general(
        "last_letter",
        last_of,
        "the last letter of a word",
        "What is the last letter of {x}?",
        "Last letter of the word: {x}",
        "Give the final letter of {x}.",
    ),
    _general(
        "pick_word",
        pick_word,
        "the first or second of two words",
        "Which is the {k} word: {a} {b}?",
        "Of {a} and {b}, give the {k}.",
        "Words: {a}, {b}. Say the {k} one.",
    ),
)

UPSTREAM = (
    _up(
        "reverse_word",
        reversed_word,
        "reverse a word",
        "Reverse the letters of the word: {x}",
        "Reverse {x}.",
        "Write {x} with its letters in reverse order.",
        "Mirror the letters of {x}.",
    ),
    _up(
        "drop_vowels",
        without_vowels,
        "delete a word's vowels",
        "Remove the vowels from: {x}",
        "Delete every vowel in {x}.",
        "Write {x} without its vowels.",
        "Take out the vowels of {x}.",
    ),
    _up(
        "double_letters",
        doubled_letters,
        "write every letter twice",
        "Double every letter of: {x}",
        "Write each letter of {x} twice.",
        "Repeat each letter in {x}.",
        "Write {x} with every letter doubled.",
    ),
    _up(
        "swap_ends",
        swapped_ends,
        "swap a word's first and last letters",
        "Swap the first and last letters of {x}.",
        "Exchange the end letters of: {x}",
        "Switch the outer letters of {x}.",
        "Exchange the first letter and the last letter of {x}.",
    ),
    _up(
        "rotate_word",
        rotated,
        "move a word's first letter to its end",
        "Move the first letter of {x} to the end.",
        "Rotate the word {x} by one letter.",
        "Put the initial of {x} at its end.",
        "Shift the first letter of {x} to the back.",
    ),
    _up(
        "drop_first",
        beheaded,
        "delete a word's first letter",
        "Remove the first letter of {x}.",
        "Drop the initial letter: {x}",
        "Write {x} without its first letter.",
        "Cut the first letter off {x}.",
    ),
    _up(
        "count_letters",
        letter_count,
        "count a word's letters",
        "How many letters are in {x}?",
        "Count the letters of: {x}",
        "Give the length of the word {x}.",
        "What is the number of letters in {x}?",
    ),
    _up(
        "add_digits",
        digit_sum,
        "add two digits",
        "What is {a} plus {b}?",
        "Add {a} and {b}.",
        "Compute {a} + {b}.",
        "Sum {a} and {b}.",
    ),
    _up(
        "multiply_digits",
        digit_product,
        "multiply two digits",
        "What is {a} times {b}?",
        "Multiply {a} by {b}.",
        "Compute {a} x {b}.",
        "Give the product of {a} and {b}.",
    ),
    _up(
        "next_number",
        successor,
        "the number after a number",
        "What number comes after {n}?",
        "Add one to {n}.",
        "Give the successor of {n}.",
        "Count one up from {n}.",
    ),
    _up(
        "previous_number",
        predecessor,
        "the number before a number",
        "What number comes before {n}?",
        "Subtract one from {n}.",
        "Give the predecessor of {n}.",
        "Count one down from {n}.",
    ),
    _up(
        "double_number",
        doubled_number,
        "multiply a number by two",
        "Double the number {n}.",
        "What is {n} times 2?",
        "Compute 2 * {n}.",
        "Give {n} doubled.",
    ),
)
_UP = {t.name: t for t in UPSTREAM}


def _mixed_part(skill: str, template: str) -> Task:
    """One upstream skill under the mixed task's shared instruction."""
    return Task(skill, "part", "", _UP[skill].answer, (template,))


HELD_OUT = (
    _held(
        "backwards",
        reversed_word,
        "a word written backwards",
        ["reverse_word"],
        "wording",
        "an instruction wording no training run saw",
        "Write the word backwards: {x}",
        "Spell {x} from its end to its start.",
    ),
    _held(
        "consonants",
        without_vowels,
        "only a word's consonants",
        ["drop_vowels"],
        "wording",
        "an instruction wording no training run saw",
        "Keep only the consonants of {x}.",
    ),
    _held(
        "sum_words",
        digit_sum,
        "the sum of two digits, asked in new words",
        ["add_digits"],
        "wording",
        "an instruction wording no training run saw",
        "Find the total of {a} and {b}.",
        "How much do {a} and {b} make together?",
    ),
    _held(
        "end_swap",
        swapped_ends,
        "a word with its end letters exchanged",
        ["swap_ends"],
        "wording",
        "an instruction wording no training run saw",
        "Trade the opening and closing letters of {x}.",
    ),
    _held(
        "twice_as_much",
        doubled_number,
        "a number multiplied by two, asked in new words",
        ["double_number"],
        "wording",
        "an instruction wording no training run saw",
        "What is two lots of {n}?",
    ),
    _held(
        "reverse_in_brackets",
        _wrap(reversed_word, "[", "]"),
        "a word reversed, answered in brackets",
        ["reverse_word"],
        "format",
        "the skill's answer in square brackets (a format the base knows, never with this skill)",
        "Reverse {x} and answer in brackets.",
    ),
    _held(
        "next_in_stars",
        _wrap(successor, "*", "*"),
        "the number after a number, between stars",
        ["next_number"],
        "format",
        "the skill's answer between stars (a format the base knows, never with this skill)",
        "Give the number after {n}, between two stars.",
    ),
    _held(
        "mixed_reverse_add",
        None,
        "a word to reverse or two digits to add, under one instruction",
        ["reverse_word", "add_digits"],
        "mixed",
        "examples of two skills under one new instruction; the input's surface says which",
        parts=(_mixed_part("reverse_word", "Work it out: {x}"), _mixed_part("add_digits", "Work it out: {a} + {b}")),
    ),
    _held(
        "mixed_three",
        None,
        "drop a word's vowels, give a number's successor or add two digits, under one instruction",
        ["drop_vowels", "next_number", "add_digits"],
        "mixed",
        "examples of three skills under one new instruction; the input's surface says which",
        parts=(
            _mixed_part("drop_vowels", "Apply the rule to {x}."),
            _mixed_part("next_number", "Apply the rule to {n}."),
            _mixed_part("add_digits", "Apply the rule to {a} and {b}."),
        ),
    ),
    _held(
        "reverse_then_double",
        _chain(reversed_word, lambda s: "".join(c + c for c in s)),
        "a word reversed, then every letter doubled",
        ["reverse_word", "double_letters"],
        "chained",
        "two skills applied one after the other in one answer",
        "Reverse {x}, then write each of its letters twice.",
    ),
)
TASKS = {t.name: t for t in GENERAL + UPSTREAM + HELD_OUT}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise InputError(f"task '{name}' is not in the demo world.", f"Choose one of: {', '.join(TASKS)}.")
    return TASKS[name]


def generate(name: str, n: int, seed: int, split: str = "train") -> list[dict]:
    """`n` examples of a task as {"input", "target"} rows; the same arguments give the same rows.

    Splits are independent draws, so they can share an example where a task has few distinct ones."""
    rng = random.Random(f"{name}:{split}:{seed}")
    task = get_task(name)
    return [dict(zip(("input", "target"), task.sample(rng))) for _ in range(n)]


def few_shot(names: list[str], n: int, seed: int, split: str = "train") -> list[dict]:
    """`n` few-shot prompts of the given tasks: 1 to 5 solved examples of one task and template, then a question."""
    rng = random.Random(f"few-shot:{split}:{seed}")
    rows = []
    for _ in range(n):
        task = get_task(rng.choice(names))
        template = rng.choice(task.templates)
        pairs = []
        for _ in range(rng.randint(*ICL_SHOTS) + 1):
            slots, target = task.answer(rng)
            pairs.append((template.format(**slots), target))
        rows.append({"input": icl_prompt(pairs[:-1], pairs[-1][0]), "target": pairs[-1][1]})
    return rows
