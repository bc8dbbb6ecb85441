"""fedtune: privacy-preserving federated fine-tuning of Transformers with LoRA and DP-SGD."""

__version__ = "0.1.0"
