"""Hugging Face: the declarative name map, export/import, the logits parity check, weight files."""
