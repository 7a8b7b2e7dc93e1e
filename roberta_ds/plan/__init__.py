"""The planner: memory, micro batch and time for a cluster job (`roberta-ds plan`)."""
