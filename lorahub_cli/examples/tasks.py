"""Eight clearly different synthetic tasks, generated from templates with a fixed seed.

They stand in for an adapter library's training data: each adapter of the
example library gets one task's examples as its card data, and held-out
examples of the same tasks serve as shots and inputs for retrieval.
"""

from __future__ import annotations

import random

ADJECTIVES = {
    "positive": ["wonderful", "delightful", "brilliant", "moving", "charming", "superb", "uplifting", "gorgeous"],
    "negative": ["dull", "awful", "tedious", "clumsy", "boring", "dreadful", "lifeless", "irritating"],
}
SUBJECTS = ["film", "soundtrack", "acting", "plot", "ending", "dialogue", "direction", "cast", "script", "pacing"]
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Chile": "Santiago",
    "India": "New Delhi",
    "Mexico": "Mexico City",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Cuba": "Havana",
}
FRENCH_NOUNS = {
    "house": ("maison", "f"),
    "cat": ("chat", "m"),
    "car": ("voiture", "f"),
    "book": ("livre", "m"),
    "tree": ("arbre", "m"),
    "door": ("porte", "f"),
    "dog": ("chien", "m"),
    "table": ("table", "f"),
}
FRENCH_ADJECTIVES = {
    "red": ("rouge", "rouge"),
    "small": ("petit", "petite"),
    "green": ("vert", "verte"),
    "big": ("grand", "grande"),
    "black": ("noir", "noire"),
    "white": ("blanc", "blanche"),
}
WORDS = [
    "apple",
    "river",
    "candle",
    "mountain",
    "pencil",
    "garden",
    "window",
    "tiger",
    "violin",
    "bottle",
    "cloud",
    "dragon",
    "forest",
    "hammer",
    "island",
    "jacket",
    "ladder",
    "marble",
    "needle",
    "orange",
]
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
    "cheap": "expensive",
}
ANIMALS = {
    "whale": "mammal",
    "eagle": "bird",
    "salmon": "fish",
    "lizard": "reptile",
    "dolphin": "mammal",
    "sparrow": "bird",
    "shark": "fish",
    "turtle": "reptile",
    "horse": "mammal",
    "owl": "bird",
    "trout": "fish",
    "snake": "reptile",
    "bat": "mammal",
    "penguin": "bird",
    "tuna": "fish",
    "crocodile": "reptile",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def sentiment(rng: random.Random) -> dict:
    label = rng.choice(["positive", "negative"])
    first, second = rng.sample(SUBJECTS, 2)
    text = f"The {first} was {rng.choice(ADJECTIVES[label])} and the {second} felt {rng.choice(ADJECTIVES[label])}."
    return {"input": f"Review: {text} Is this movie review positive or negative?", "target": label}


def addition(rng: random.Random) -> dict:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return {"input": f"What is {a} plus {b}?", "target": str(a + b)}


def capitals(rng: random.Random) -> dict:
    country = rng.choice(sorted(CAPITALS))
    return {"input": f"What is the capital city of {country}?", "target": CAPITALS[country]}


def translate_french(rng: random.Random) -> dict:
    noun = rng.choice(sorted(FRENCH_NOUNS))
    adjective = rng.choice(sorted(FRENCH_ADJECTIVES))
    french, gender = FRENCH_NOUNS[noun]
    article = "le" if gender == "m" else "la"
    return {
        "input": f"Translate into French: the {adjective} {noun}",
        "target": f"{article} {french} {FRENCH_ADJECTIVES[adjective][gender == 'f']}",
    }


def word_sorting(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(3, 6))
    return {"input": f"Sort the following words alphabetically: {', '.join(words)}", "target": " ".join(sorted(words))}


def antonyms(rng: random.Random) -> dict:
    word = rng.choice(sorted(ANTONYMS))
    return {"input": f"Give the opposite of the word '{word}'.", "target": ANTONYMS[word]}


def animal_class(rng: random.Random) -> dict:
    animal = rng.choice(sorted(ANIMALS))
    return {
        "input": f"Which class does the {animal} belong to: mammal, bird, fish or reptile?",
        "target": ANIMALS[animal],
    }


def weekdays(rng: random.Random) -> dict:
    start, offset = rng.randrange(7), rng.randint(1, 6)
    return {
        "input": f"If today is {DAYS[start]}, what day of the week will it be in {offset} days?",
        "target": DAYS[(start + offset) % 7],
    }


TASKS = {
    f.__name__: f
    for f in (sentiment, addition, capitals, translate_french, word_sorting, antonyms, animal_class, weekdays)
}


def generate(task: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{task}:{seed}")
    return [TASKS[task](rng) for _ in range(n)]
