import pytest
import torch
from torch import nn

from bentoservice.training.config import TrainingError
from bentoservice.training.methods.runs import refuse_diverged


def test_a_run_with_nan_in_trained_weights_is_refused_and_frozen_ones_do_not_count() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].weight.requires_grad_(False)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # frozen base weights are not the run's
    refuse_diverged(model)
    with torch.no_grad():
        model[1].bias[2] = float("inf")
    with pytest.raises(TrainingError, match="1 trained tensors hold NaN or inf .first: 1.bias"):
        refuse_diverged(model)
