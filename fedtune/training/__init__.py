"""Local training of the LoRA adapter (DP-SGD via Opacus, mixed precision via torch.autocast)."""
