"""`roberta-ds quickstart`: the whole pipeline on the built-in corpus, with its report."""
