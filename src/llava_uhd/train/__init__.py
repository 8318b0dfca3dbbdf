"""Training LLaVA-UHD: the paper's two-stage recipe on top of the transformers `Trainer` (DeepSpeed / FSDP / DDP
come from the existing engines)."""
