"""Training data: file formats and their checks, the file store, the loss's ignore label."""
