"""Fine-tuning: training data formats and the LoRA trainer."""
