"""A rerank or embedding evaluation's figures from each group's scores (the positive first)."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import EvalPrediction

from bentoservice.training.methods.encoders import group_metrics


def test_accuracy_and_mrr_rank_the_positive_within_its_group() -> None:
    scores = np.array(
        [
            [3.0, 1.0, 2.0, 0.0],  # positive first: rank 1
            [1.0, 2.0, 0.0, 0.5],  # rank 2
            [0.0, 1.0, 2.0, 3.0],  # rank 4
        ]
    )
    figures = group_metrics(EvalPrediction(predictions=scores, label_ids=np.zeros(3)))
    assert figures["accuracy"] == pytest.approx(1 / 3)
    assert figures["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)
