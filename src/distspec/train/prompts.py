"""The drafter's training prompts: many kinds of request, generated from templates.

Kept apart from the benchmark and test prompts (tests assert no overlap). Deterministic for a
given seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable

TOPICS = [
    "the water cycle",
    "black holes",
    "the French Revolution",
    "machine learning",
    "volcanoes",
    "the immune system",
    "climate change",
    "the stock market",
    "ancient Rome",
    "honey bees",
    "electric cars",
    "the internet",
    "coral reefs",
    "the printing press",
    "vaccines",
    "renewable energy",
    "the moon landing",
    "plate tectonics",
    "democracy",
    "coffee",
    "the human heart",
    "rainforests",
    "quantum computing",
    "the Silk Road",
    "earthquakes",
    "recycling",
    "the Olympic Games",
    "DNA",
    "solar panels",
    "the Great Wall of China",
    "inflation",
    "sleep",
    "music theory",
    "chess",
    "the Renaissance",
    "glaciers",
    "bread baking",
    "cybersecurity",
    "photosynthesis in algae",
    "time zones",
    "the theory of evolution",
    "bicycles",
    "language learning",
    "the periodic table",
    "hurricanes",
    "public libraries",
]
PEOPLE = [
    "a student",
    "a nurse",
    "a small business owner",
    "a retired teacher",
    "a chef",
    "a software engineer",
    "a farmer",
    "a teenager",
    "a librarian",
    "a pilot",
]
LANGS = ["Python", "JavaScript", "Rust", "Go", "C", "Java", "SQL", "Bash", "TypeScript"]
CODE_TASKS = [
    "reverses a linked list",
    "counts the words in a text file",
    "checks if a number is prime",
    "merges two sorted lists",
    "computes the Fibonacci sequence iteratively",
    "parses a CSV line into fields",
    "finds the most common element in a list",
    "validates an email address",
    "computes the factorial of n",
    "flattens a nested list",
    "converts Celsius to Fahrenheit",
    "implements binary search",
    "removes duplicates from a list",
    "sorts a list of dictionaries by a key",
    "reads a JSON file and prints its keys",
    "computes the greatest common divisor",
    "checks balanced parentheses",
    "generates a random password",
    "computes the median of a list",
    "capitalizes every word",
]
NAMES = [
    "Alice",
    "Ben",
    "Chloe",
    "Daniel",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kemi",
    "Luca",
    "Mei",
    "Noah",
    "Olga",
    "Pablo",
]
CITIES = [
    "Paris",
    "Tokyo",
    "Nairobi",
    "Toronto",
    "Lima",
    "Oslo",
    "Cairo",
    "Sydney",
    "Madrid",
    "Seoul",
    "Dublin",
    "Austin",
    "Lagos",
    "Hanoi",
]
HOBBIES = [
    "gardening",
    "chess",
    "running",
    "baking",
    "photography",
    "knitting",
    "cycling",
    "painting",
    "fishing",
    "reading",
    "climbing",
    "singing",
]
THINGS = [
    "a lighthouse",
    "a lost key",
    "a talking cat",
    "an old map",
    "a broken clock",
    "a dragon",
    "a secret garden",
    "a time machine",
    "a robot",
    "a storm",
    "a letter",
]
SENTENCES = [
    "The meeting was moved to Thursday because several people were travelling.",
    "Our team finished the project two weeks ahead of schedule.",
    "The new policy requires all visitors to sign in at the front desk.",
    "Sales increased by twelve percent in the last quarter.",
    "The park will be closed for repairs until the end of the month.",
    "Please remember to bring your own water bottle to the event.",
    "The software update fixes several bugs and improves battery life.",
    "Many residents complained about the noise from the construction site.",
    "The library now offers free language classes on Saturday mornings.",
    "The train was delayed by forty minutes due to a signal failure.",
    "Customers can now return items within sixty days of purchase.",
    "The museum's new exhibition features paintings from the nineteenth century.",
]

TEMPLATES = {
    "facts": [
        "What is {topic}?",
        "Explain {topic} in simple terms.",
        "Give me three facts about {topic}.",
        "Why is {topic} important?",
        "How would you explain {topic} to {person}?",
        "What are common misconceptions about {topic}?",
        "Tell me the history of {topic}.",
    ],
    "lists": [
        "List {n} tips for {hobby}.",
        "List {n} interesting facts about {topic}.",
        "Give me a numbered list of {n} ideas for a weekend in {city}.",
        "What are {n} pros and cons of {topic}?",
        "List {n} questions {person} might ask about {topic}.",
    ],
    "code": [
        "Write a {lang} function that {task}.",
        "Write a {lang} program that {task}. Add comments.",
        "Explain how to write code in {lang} that {task}.",
        "Write a {lang} function that {task}, and a short test for it.",
    ],
    "chat": [
        "Hi! I'm {name} and I love {hobby}. Any advice for a beginner?",
        "Can you help me plan a trip to {city}?",
        "I feel tired every afternoon. What can I do?",
        "What should I cook for dinner tonight?",
        "How do I start learning {hobby}?",
        "My friend {name} is moving to {city}. What gift should I give?",
        "Can you recommend a good way to learn about {topic}?",
    ],
    "rewrite": [
        "Rewrite this text to be more formal:\n\n{text}",
        "Summarize in one sentence:\n\n{text}",
        "Rewrite this for a child:\n\n{text}",
        "Make this text shorter:\n\n{text}",
        "Rewrite in the future tense:\n\n{text}",
        "Fix the grammar and improve the style:\n\n{text}",
        "Turn this into a bulleted list:\n\n{text}",
    ],
    "json": [
        "Return a JSON object with the keys name, city and hobby for: {name} lives in {city} and "
        "likes {hobby}.",
        "Write a JSON array of {n} objects describing cities, each with name and country.",
        "Convert to JSON: {name}, age {age}, from {city}, enjoys {hobby} and {hobby2}.",
        "Create a JSON schema for a user profile with name, email and age.",
    ],
    "story": [
        "Write a short story about {thing}.",
        "Tell a bedtime story about {name} and {thing}.",
        "Write a poem about {topic}.",
        "Write a short story set in {city} about {person}.",
        "Write the opening paragraph of a mystery novel involving {thing}.",
    ],
}


def training_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts, cycling through the kinds in TEMPLATES (skipping repeats)."""
    rng = random.Random(seed)
    kinds = list(TEMPLATES)

    def make(attempt: int) -> str:
        kind = kinds[attempt % len(kinds)]
        return rng.choice(TEMPLATES[kind]).format(**_slots(rng))

    return _distinct(n, make, "the templates")


def _distinct(n: int, make: Callable[[int], str], source: str) -> list[str]:
    """The first n distinct results of make(1), make(2), ... (giving up after 50 n tries)."""
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n:
            raise ValueError(f"cannot make {n} distinct prompts from {source}")
        prompt = make(attempts)
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def _slots(rng: random.Random) -> dict[str, str]:
    hobby, hobby2 = rng.sample(HOBBIES, 2)
    return {
        "topic": rng.choice(TOPICS),
        "person": rng.choice(PEOPLE),
        "lang": rng.choice(LANGS),
        "task": rng.choice(CODE_TASKS),
        "name": rng.choice(NAMES),
        "city": rng.choice(CITIES),
        "hobby": hobby,
        "hobby2": hobby2,
        "thing": rng.choice(THINGS),
        "n": str(rng.randint(3, 7)),
        "age": str(rng.randint(18, 80)),
        "text": " ".join(rng.sample(SENTENCES, rng.randint(2, 4))),
    }


# Requests about a given text or piece of code. The texts are the target's own earlier answers
# (see `derived_prompts`), so this family reaches far beyond the fixed sentences above and
# teaches the drafter to copy and transform text it has never seen.
TEXT_TASKS = [
    "Summarize the following text in two sentences:\n\n{text}",
    "Give a one-paragraph summary of this:\n\n{text}",
    "Rewrite this text so that it sounds more formal:\n\n{text}",
    "Rewrite this message in a friendly, polite tone:\n\n{text}",
    "Rewrite the following in the past tense:\n\n{text}",
    "Rewrite the following in the future tense:\n\n{text}",
    "Put this into plain, simple English:\n\n{text}",
    "Explain this text to a ten-year-old:\n\n{text}",
    "Proofread this and correct any mistakes:\n\n{text}",
    "Turn the following text into a bulleted list of its main points:\n\n{text}",
    "Extract the key facts from this text as a JSON object:\n\n{text}",
    "Write a short title for this text:\n\n{text}",
    "Continue this text with one more paragraph:\n\n{text}",
    "Shorten this text to about half its length:\n\n{text}",
    "Turn this into a short email to a colleague:\n\n{text}",
    "What is the main idea of this passage?\n\n{text}",
    "Write three questions a reader might ask about this text:\n\n{text}",
    "Paraphrase the following paragraph:\n\n{text}",
]
CODE_TASKS_ON_CODE = [
    "Find and fix the bug in this code:\n\n{code}",
    "There is a mistake in this function. What is wrong, and how do I correct it?\n\n{code}",
    "Explain what this code does, line by line:\n\n{code}",
    "Add comments and a docstring to this code:\n\n{code}",
    "Rewrite this code in {lang}:\n\n{code}",
    "Write unit tests for this code:\n\n{code}",
    "How could this code be made faster or cleaner?\n\n{code}",
    "Review this code and suggest improvements:\n\n{code}",
]
# Small edits that plant a bug in working code (for the "fix the bug" tasks).
BUGS = [
    (" + ", " - "),
    (" < ", " <= "),
    (" == ", " != "),
    ("return ", "return 1 + "),
    ("[0]", "[1]"),
]


def derived_prompts(sources: list[str], n: int, seed: int = 0) -> list[str]:
    """n distinct requests about paragraphs and code blocks found in `sources` (earlier model
    answers). Deterministic for given sources and seed."""
    paragraphs, code = _paragraphs_and_code(sources)
    if not paragraphs or not code:
        raise ValueError("the source texts hold no usable paragraphs or code blocks")
    rng = random.Random(seed)

    def make(_: int) -> str:
        if rng.random() < 0.25:
            snippet = rng.choice(code)
            task = rng.choice(CODE_TASKS_ON_CODE)
            if task.startswith(("Find and fix", "There is a mistake")):
                snippet = _plant_bug(snippet, rng)
            return task.format(code=snippet, lang=rng.choice(LANGS))
        k = rng.choice([1, 1, 2])
        start = rng.randrange(len(paragraphs) - k + 1)
        return rng.choice(TEXT_TASKS).format(text="\n\n".join(paragraphs[start : start + k]))

    return _distinct(n, make, f"{len(sources)} sources")


def _paragraphs_and_code(sources: list[str]) -> tuple[list[str], list[str]]:
    paragraphs, code = [], []
    for src in sources:
        parts = src.split("```")
        for i, part in enumerate(parts):
            if i % 2:  # inside a fence: drop the language tag line
                body = part.split("\n", 1)[1] if "\n" in part else ""
                if 2 <= body.count("\n") <= 24 and i + 1 < len(parts):
                    code.append(body.strip("\n"))
                continue
            for para in part.split("\n\n"):
                para = para.strip()
                words = len(para.split())
                if 20 <= words <= 90 and para[-1:] in ".!?" and not para.startswith("#"):
                    paragraphs.append(para)
    return paragraphs, code


def _plant_bug(code: str, rng: random.Random) -> str:
    options = [(a, b) for a, b in BUGS if a in code]
    if not options:
        return code
    a, b = rng.choice(options)
    i = rng.choice([j for j in range(len(code)) if code.startswith(a, j)])
    return code[:i] + b + code[i + len(a) :]
