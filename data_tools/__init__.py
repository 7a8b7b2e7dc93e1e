"""Corpus tools: tokenizer training, sharding, inspection, verification, merging."""
