"""Read tensors from a checkpoint file: safetensors, or a PyTorch state dict (``.pt``/``.bin``).

Most checkpoints are safetensors, read lazily (one tensor at a time). Some formats ship
``torch.save`` state dicts instead (SqueezeLLM's released models, older ``pytorch_model.bin``
folders): those load once, with ``weights_only=True`` (no code from the file runs) and
memory-mapped where the file allows it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch

STATE_DICT_SUFFIXES = (".pt", ".bin", ".pth")


class TensorFile(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> torch.Tensor: ...


class _Safetensors:
    def __init__(self, handle) -> None:  # a safetensors safe_open handle
        self._fh = handle

    def names(self) -> list[str]:
        return list(self._fh.keys())  # noqa: SIM118 (safe_open is not iterable)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._fh.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._fh.get_tensor(name)


class _StateDict:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


@contextmanager
def open_tensor_file(file: Path) -> Iterator[TensorFile]:
    """The tensors of ``file`` by name (a clear ``ValueError`` for a file that is neither)."""
    if file.suffix in STATE_DICT_SUFFIXES:
        yield _StateDict(_load_state_dict(file))
        return
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as fh:
        yield _Safetensors(fh)


def _load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # an old (non-zip) serialization cannot be memory-mapped
            loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused: not a plain state dict of tensors
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{file}: not a PyTorch state dict of tensors ({first})") from exc
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{file}: expected a dict of tensor names to tensors")
    return state
