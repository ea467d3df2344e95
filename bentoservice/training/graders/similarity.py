"""text_similarity: the rendered input against the rendered reference, a score in [0, 1] by `evaluation_metric`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from bentoservice.training.graders import protocol
from bentoservice.training.graders.base import Grader
from bentoservice.training.graders.errors import GraderError
from bentoservice.training.graders.models import ModelClient

Metric = Callable[[str, str], float]


def fuzzy_match(text: str, reference: str) -> float:
    """rapidfuzz's normalised Indel similarity (1 - edits / total length)."""
    from rapidfuzz import fuzz

    return fuzz.ratio(text, reference) / 100


def bleu(text: str, reference: str) -> float:
    """sacrebleu's sentence BLEU (exponential smoothing), on 0..1 instead of 0..100."""
    import sacrebleu

    return min(1.0, sacrebleu.sentence_bleu(text, [reference]).score / 100)


def gleu(text: str, reference: str) -> float:
    """NLTK's sentence GLEU (Google's sentence-level BLEU) over whitespace tokens."""
    from nltk.translate.gleu_score import sentence_gleu

    return float(sentence_gleu([reference.split()], text.split()))


def rouge(kind: str) -> Metric:
    """rouge-score's F-measure (`rouge1`..`rouge5`, `rougeL`), its default tokenizer, no stemming."""

    def metric(text: str, reference: str) -> float:
        from rouge_score import rouge_scorer

        return float(rouge_scorer.RougeScorer([kind]).score(reference, text)[kind].fmeasure)

    return metric


METRICS: dict[str, Metric] = {
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    "gleu": gleu,
    **{f"rouge_{n}": rouge(f"rouge{n}") for n in range(1, 6)},
    "rouge_l": rouge("rougeL"),
}
REFUSED = {"meteor": "meteor needs NLTK's WordNet corpus, which this service does not ship (nothing is downloaded)"}


def cosine(a: list[float], b: list[float]) -> float:
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b, strict=True)) / norm if norm else 0.0


class TextSimilarityGrader(Grader):
    def __init__(
        self, spec: protocol.TextSimilarity, param: str, models: ModelClient | None, embedding_model: str | None
    ) -> None:
        super().__init__(spec.name, param, {"input": spec.input, "reference": spec.reference})
        metric = spec.evaluation_metric
        if metric in REFUSED:
            raise GraderError(
                f"evaluation_metric `{metric}` is not supported: {REFUSED[metric]}", f"{param}.evaluation_metric"
            )
        if metric == "cosine" and (models is None or embedding_model is None):
            raise GraderError(
                "evaluation_metric `cosine` needs the served embedding model, and this service serves none",
                f"{param}.evaluation_metric",
            )
        self.metric, self.models, self.embedding_model = metric, models, embedding_model

    def score(self, sample: dict[str, Any], item: dict[str, Any]) -> float:
        text, reference = self.render("input", sample, item), self.render("reference", sample, item)
        if self.metric != "cosine":
            return METRICS[self.metric](text, reference)
        assert self.models is not None and self.embedding_model is not None  # checked in __init__
        first, second = self.models.embed(self.embedding_model, [text or " ", reference or " "])
        return cosine(first, second)
