"""The coordinator's own model: central evaluation of each aggregate, and adapter export."""

from __future__ import annotations

import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

from fedtune.adapters import get_adapter_arrays, set_adapter_arrays
from fedtune.config import FedTuneConfig
from fedtune.data import LabelMap, pad_collate
from fedtune.data.site import encode_rows
from fedtune.evaluation import evaluate, generation_scores
from fedtune.io_utils import atomic_replace_dir
from fedtune.local import save_adapter, seed_everything
from fedtune.model import ModelLoadError, build_model, load_tokenizer, resolve_device, uses_chat_template


class CentralEvaluator:
    def __init__(self, cfg: FedTuneConfig, rows: pd.DataFrame, columns: list[str], label_map: LabelMap | None,
                 source: str):
        seed_everything(cfg.train.seed)
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.tokenizer = load_tokenizer(cfg.model)
        id2label = dict(enumerate(label_map.labels)) if label_map is not None else None
        # Same seed as every site: the classification head starts identical everywhere.
        self.model = build_model(cfg.model, cfg.lora, self.tokenizer, id2label, self.device, cfg.train.seed)
        if cfg.federation.merge_final and getattr(self.model.config, "fedtune_pooling", None) == "mean":
            # A plain transformers model has no masked mean pooling: its merged export would
            # silently classify from the (untrained) CLS pooler. Refuse before round 1.
            raise ModelLoadError("federation.merge_final = true needs model.pooling = 'cls': a merged plain "
                                 "transformers model cannot carry the mean-pooling head (the PEFT adapter export "
                                 "loads with fedtune's own model loader)")
        self.dataset = encode_rows(rows, columns, cfg.model.task, self.tokenizer, cfg.model.max_length, label_map,
                                   source, uses_chat_template(cfg.model, self.tokenizer))
        self.collate = pad_collate(self.tokenizer.pad_token_id)
        self.names = list(get_adapter_arrays(self.model).keys())
        self.last_samples: list[dict] = []  # prompts with the latest evaluation's answers

    def initial_arrays(self) -> "OrderedDict[str, np.ndarray]":
        return get_adapter_arrays(self.model)

    def named(self, arrays: list[np.ndarray]) -> "OrderedDict[str, np.ndarray]":
        return OrderedDict(zip(self.names, (np.asarray(a, dtype=np.float32) for a in arrays)))

    def evaluate(self, arrays: list[np.ndarray]) -> dict:
        """Loss and accuracy/F1 (perplexity for causal LM); for prompt/response rows also the
        generated answers' scores, the first few answers kept in ``last_samples``."""
        set_adapter_arrays(self.model, self.named(arrays))
        metrics = evaluate(self.model, self.dataset, self.collate, self.cfg.model.task, self.device,
                           "fp32", self.cfg.train.eval_batch_size)
        scores, self.last_samples = generation_scores(self.model, self.tokenizer, self.dataset, self.cfg.eval,
                                                      self.cfg.model.max_length, self.device)
        return {**metrics, **scores}

    def export(self, arrays: list[np.ndarray], folder: Path) -> None:
        """The adapter in PEFT format (PeftModel.from_pretrained loads it)."""
        set_adapter_arrays(self.model, self.named(arrays))
        save_adapter(self.model, folder, self.cfg.model)

    def export_merged(self, arrays: list[np.ndarray], folder: Path) -> None:
        """The base model with the adapter merged in, as a plain transformers model."""
        import copy

        set_adapter_arrays(self.model, self.named(arrays))
        merged = copy.deepcopy(self.model).merge_and_unload()
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        merged.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        atomic_replace_dir(tmp, folder)
