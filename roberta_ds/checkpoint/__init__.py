"""Checkpoints: committing a save (staging, manifest, atomic rename), choosing and verifying a resume,
reading DeepSpeed's files into an fp32 state dict."""
