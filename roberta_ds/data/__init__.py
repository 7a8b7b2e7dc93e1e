"""Data: the shard format (.bin/.idx + manifest), block packing, sampling, masking, the loader, the tokenizer.

Single-process code: nothing here imports deepspeed or torch.distributed."""
