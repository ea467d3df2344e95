"""Adapter routes (OpenLLM's /v1/adapters, vLLM's load/unload_lora_adapter)."""
