"""Scores of one prediction against one target.

exact match (the primary metric, the reference's): both sides stripped, lower-cased and
with every '.' deleted, then compared.

option letter (secondary, labelled as such): for multiple-choice targets "(X)", the first
option the prediction names, as "(X)", a bare letter, or the text of option X in the input,
is compared with X. Other targets are scored by exact match. It forgives answer formats
("B", "(B) Paris", "Paris") that exact match counts wrong.
"""

from __future__ import annotations

import re

_LETTER_TARGET = re.compile(r"^\(([A-Z])\)$")
# An option runs from its "(X)" to the next option or the end of the line: BBH lists one per line,
# other tasks inline ("(A) negative (B) positive").
_OPTION = re.compile(r"\(([A-Z])\)[ \t]*([^\n]*?)[ \t]*(?=\([A-Z]\)|\n|$)")
_PREDICTED_LETTER = re.compile(r"^\(?([A-Za-z])(?:\)|$|[\s.:,])")


def normalize(text: str) -> str:
    return text.strip().lower().replace(".", "")


def exact_match(prediction: str, target: str) -> bool:
    return normalize(prediction) == normalize(target)


def options(question: str) -> dict[str, str]:
    """The options "(A) text" listed in a question, letter -> normalised text."""
    return {letter: normalize(text) for letter, text in _OPTION.findall(question) if text.strip()}


def predicted_letter(prediction: str, question: str) -> str | None:
    # The option's text first: an answer such as "a mammal" names an option, not the letter A.
    by_text = {v: k for k, v in options(question).items()}
    if normalize(prediction) in by_text:
        return by_text[normalize(prediction)]
    match = _PREDICTED_LETTER.match(prediction.strip())
    return match.group(1).upper() if match else None


def option_letter_match(prediction: str, target: str, question: str) -> bool:
    wanted = _LETTER_TARGET.match(target.strip())
    if not wanted:
        return exact_match(prediction, target)
    return predicted_letter(prediction, question) == wanted.group(1)


def score(examples, predictions: list[str]) -> dict:
    """Both metrics, in percent, of predictions for examples (with input and target), in the same order."""
    em = [exact_match(p, e.target) for e, p in zip(examples, predictions)]
    letter = [option_letter_match(p, e.target, e.input) for e, p in zip(examples, predictions)]
    return {"exact_match": 100 * sum(em) / len(em), "option_letter": 100 * sum(letter) / len(letter)}
