"""The label that leaves a token out of the loss (the convention of transformers and TRL)."""

IGNORE = -100
