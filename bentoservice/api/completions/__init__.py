"""Models, chat completions, completions and chat templates: request bodies (protocol.py) and routes."""
