"""The model cards (YAML, package data), read by store.cards with importlib.resources."""
