"""Fine-tuning jobs: the body (protocol.py), its dialects turned into a job config (dialects.py), routes."""
