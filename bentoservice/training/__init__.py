"""Fine-tuning: data/, methods/, jobs/, speed/, distributed/; TrainingConfig (config.py), where it runs (hardware.py),
AutoLLM (auto.py), the CLI pieces (commands.py)."""
