"""Open questions for a chat model, scored by a behaviour that can be checked without a judge.

The questions are generated from templates × topics (deterministic, offline), split into training and
held-out sets by a stable hash so evaluations never see a training question.  ``french`` scores 1
when the answer is written in French (French function words outnumber English ones): the behaviour
that "Answer in French." gives SmolLM2-135M-Instruct when it is in the teacher's context.
"""

from __future__ import annotations

import random
import re

from orchestrator.data import Prompt
from orchestrator.environments.base import Environment, is_heldout

TEMPLATES = [
    "What is {t}?",
    "Why is {t} important?",
    "Describe {t} in a few sentences.",
    "How would you explain {t} to a child?",
    "What are the main uses of {t}?",
    "Tell me an interesting fact about {t}.",
    "What is the history of {t}?",
    "What are the advantages and disadvantages of {t}?",
]
TOPICS = [
    "the sun", "a bicycle", "the ocean", "bread", "a library", "music", "the moon", "coffee", "a volcano",
    "photosynthesis", "a computer", "the rain", "chess", "a forest", "electricity", "the internet", "a bridge",
    "honey", "the winter", "a train", "mathematics", "a garden", "the heart", "a river", "paper", "soap",
    "a telescope", "cheese", "the wind", "a museum", "sleep", "a mountain", "glass", "a city", "the alphabet",
    "friendship", "a clock", "rice", "the brain", "a map",
]

FR = set("le la les de des du et est un une en que qui pour dans sur pas ce cette il elle sont avec au aux "
         "par plus ou se ne sa son ses leur nous vous je tu on mais comme être été très aussi c'est l'".split())
EN = set("the and is of to a in that it for are with as on be this by you your can or an was were has have "
         "they their from which".split())


ALL = [t.format(t=topic) for t in TEMPLATES for topic in TOPICS]
TRAIN = [q for q in ALL if not is_heldout(q)]  # ~20% held out by a stable hash
HELDOUT = [q for q in ALL if is_heldout(q)]


def is_french(text: str) -> bool:
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ']+", text.lower())
    fr = sum(w in FR for w in words)
    en = sum(w in EN for w in words)
    return fr >= 2 and fr > 2 * en


class OpenQuestions(Environment):
    """Training prompts drawn from ``TRAIN``; evaluation on the first ``n`` of ``HELDOUT``.

    ``suffix`` (a subclass's instruction, if any) is appended to every question.
    """

    suffix = ""

    def _prompt(self, question: str) -> Prompt:
        return Prompt(text=f"{question} {self.suffix}" if self.suffix else question)

    def generate(self, rng: random.Random) -> Prompt:
        return self._prompt(rng.choice(TRAIN))

    def eval_prompts(self, n: int) -> list[Prompt]:
        return [self._prompt(q) for q in HELDOUT[:n]]


class FrenchAnswers(OpenQuestions):
    name = "french"

    def grade(self, prompt: Prompt, completion: str) -> float:
        return float(is_french(completion))
