"""`fedtune generate`: answers from the base model plus an exported adapter, to see what training changed.

The adapter is a PEFT folder (train-local's ``adapter/``, a run's ``final_adapter/``); the base model
is named by ``--model`` or by the adapter's ``fedtune_model.json``. Prompts are formatted the way the
training formatted them (``fedtune.data.tokenization.PromptFormat``), and decoding is greedy.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

from fedtune.config import ConfigError, ModelConfig
from fedtune.data.tokenization import PromptFormat
from fedtune.evaluation import generate_answers
from fedtune.local import MODEL_NOTE
from fedtune.model import ModelLoadError, load_base_model, load_tokenizer, resolve_device, uses_chat_template


def adapter_model_config(adapter: Path, model: Optional[str] = None, gguf_file: Optional[str] = None) -> ModelConfig:
    """The base model's config: ``--model`` where given, else what the adapter folder records."""
    adapter = Path(adapter)
    peft_file = adapter / "adapter_config.json"
    if not peft_file.is_file():
        raise ModelLoadError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    peft_cfg = json.loads(peft_file.read_text())
    if peft_cfg.get("task_type") != "CAUSAL_LM":
        raise ModelLoadError(f"{adapter}: a {peft_cfg.get('task_type')} adapter; generate needs a causal-lm one")
    note = adapter / MODEL_NOTE
    cfg = ModelConfig.model_validate_json(note.read_text()) if note.is_file() else ModelConfig(
        name=peft_cfg.get("base_model_name_or_path") or "", task="causal-lm")
    if model is not None:
        cfg = cfg.model_copy(update={"name": model, "gguf_file": gguf_file})
    if not cfg.name:
        raise ModelLoadError(f"{adapter}: the adapter does not name its base model: pass --model")
    return cfg


class Generator:
    """A base model with (optionally) an adapter, answering prompts greedily."""

    def __init__(self, cfg: ModelConfig, adapter: Optional[Path] = None, device: str = "auto",
                 chat: Optional[bool] = None):
        from peft import PeftModel

        self.cfg = cfg
        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(cfg)
        base = load_base_model(cfg, self.tokenizer, device=self.device)
        self.model = PeftModel.from_pretrained(base, str(adapter)).to(self.device) if adapter is not None else base
        self.model.eval()
        use_chat = uses_chat_template(cfg, self.tokenizer) if chat is None else chat
        self.format = PromptFormat(self.tokenizer, use_chat)

    def answer(self, prompts: list[str], max_new_tokens: int = 64, adapter: bool = True,
               batch_size: int = 8) -> list[str]:
        """Greedy answers, one per prompt; ``adapter=False``: the base model's (same weights, LoRA off)."""
        ids = self.format.inputs(prompts, self.cfg.max_length)
        lora_off = not adapter and hasattr(self.model, "disable_adapter")
        with self.model.disable_adapter() if lora_off else contextlib.nullcontext():
            return generate_answers(self.model, self.tokenizer, ids, max_new_tokens, self.device, batch_size=batch_size)


def read_prompts(prompt: Optional[list[str]], prompts_file: Optional[Path]) -> list[str]:
    prompts = list(prompt or [])
    if prompts_file is not None:
        try:
            text = Path(prompts_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--prompts-file {prompts_file}: {exc.strerror}") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE (one per line)")
    return prompts
