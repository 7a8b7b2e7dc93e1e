"""roberta-ds: RoBERTa pretraining on DeepSpeed (see README.md)."""

__version__ = "0.1.0"
