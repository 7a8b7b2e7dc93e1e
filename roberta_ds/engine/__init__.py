"""The engine: setup (config -> resolved run -> DeepSpeed engine), the Trainer loop, optimizer, metrics."""
