"""The model: RobertaMLM and its attention. Single-device PyTorch; no deepspeed, no torch.distributed."""
