"""The trainable adapter as an ordered list of named numpy arrays, and back.

This is what travels between a site and the coordinator: LoRA matrices and the
classification head, nothing of the frozen base model. Works on a plain peft model and
on one that Opacus wraps (its parameters live under ``_module``).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch



class AdapterMismatchError(ValueError):
    """Arrays that do not fit the model's trainable adapter (names or shapes differ)."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The peft model inside an Opacus GradSampleModule (or the model itself)."""
    while hasattr(model, "_module") and isinstance(model._module, torch.nn.Module):
        model = model._module
    return model


def trainable_parameters(model: torch.nn.Module) -> "OrderedDict[str, torch.nn.Parameter]":
    return OrderedDict((n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad)


def get_adapter_arrays(model: torch.nn.Module) -> "OrderedDict[str, np.ndarray]":
    """Copies of every trainable tensor as float32 numpy arrays, in a fixed order.

    float32 because Flower serialises with numpy, which has no bfloat16.
    """
    return OrderedDict(
        (name, p.detach().to(device="cpu", dtype=torch.float32).numpy().copy())
        for name, p in trainable_parameters(model).items()
    )


def set_adapter_arrays(model: torch.nn.Module, arrays: "OrderedDict[str, np.ndarray] | dict") -> None:
    """Load arrays into the trainable tensors in place (Parameter objects, hooks and
    optimizer references stay valid). Any missing, extra or misshaped entry is an error."""
    params = trainable_parameters(model)
    missing = [n for n in params if n not in arrays]
    extra = [n for n in arrays if n not in params]
    if missing or extra:
        raise AdapterMismatchError(
            f"adapter names differ: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for name, p in params.items():
        value = np.asarray(arrays[name])
        if tuple(value.shape) != tuple(p.shape):
            raise AdapterMismatchError(f"adapter tensor {name!r}: shape {value.shape} != model's {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.data.copy_(torch.as_tensor(np.asarray(arrays[name]), dtype=p.dtype, device=p.device))


def arrays_to_list(arrays: "OrderedDict[str, np.ndarray]") -> tuple[list[str], list[np.ndarray]]:
    return list(arrays.keys()), list(arrays.values())


def list_to_arrays(names: list[str], values: list[np.ndarray]) -> "OrderedDict[str, np.ndarray]":
    if len(names) != len(values):
        raise AdapterMismatchError(f"{len(names)} adapter names but {len(values)} arrays")
    return OrderedDict(zip(names, values))


def pack(arrays: "list[np.ndarray]") -> "list[np.ndarray]":
    """The adapter as it travels in a Flower message: one flat array, its tensors one after the
    other in ``trainable_parameters`` order. Flower 1.42 makes every array of a message an object
    of its own, pulled with a request of its own (14 adapter arrays: 31 objects a message, 5 packed),
    and a deployed site waited 1-1.5 s for each message's objects (simulations/RESULTS.md
    section 8). Aggregation is element-wise, so averaging the packed arrays is averaging the
    tensors; SecAgg+ masks the one array as it masked the many."""
    if not arrays:
        return []
    return [np.concatenate([np.asarray(a).ravel() for a in arrays])]


def unpack(packed: "list[np.ndarray]", shapes: "list[tuple[int, ...]]") -> "list[np.ndarray]":
    """The tensors of a packed adapter (:func:`pack`), in order; anything but one flat array of
    exactly the adapter's size is an error."""
    sizes = [int(np.prod(s)) for s in shapes]
    if len(packed) != 1 or np.asarray(packed[0]).ndim != 1 or np.asarray(packed[0]).size != sum(sizes):
        got = ", ".join(str(tuple(np.asarray(a).shape)) for a in packed) or "nothing"
        raise AdapterMismatchError(f"expected the adapter packed as one flat array of {sum(sizes)} values "
                                   f"({len(shapes)} tensors), got {got}")
    flat = np.asarray(packed[0])
    cuts = np.cumsum(sizes)[:-1]
    return [part.reshape(shape) for part, shape in zip(np.split(flat, cuts), shapes)]


def adapter_num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model).values())
