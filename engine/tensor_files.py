"""Read tensors from a checkpoint file: safetensors, or a PyTorch state dict (``.pt``/``.bin``).

Most checkpoints are safetensors, read lazily (one tensor at a time). Some formats ship
``torch.save`` state dicts instead (SqueezeLLM's released models, older ``pytorch_model.bin``
folders): those load once, with ``weights_only=True`` (no code from the file runs) and
memory-mapped where the file allows it. Listing a state dict's names means unpickling it,
so a start-up read (names, then weights, then KV scales) runs inside ``reading_checkpoint()``:
there each state-dict file is unpickled once and shared, and dropped when the read ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Protocol

import torch

STATE_DICT_SUFFIXES = (".pt", ".bin", ".pth")

# safetensors' dtype codes (as ``get_slice(name).get_dtype()`` gives them) as torch dtypes
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# The state dicts unpickled so far in the active ``reading_checkpoint()``, by file.
_shared_state_dicts: ContextVar[dict[Path, dict[str, torch.Tensor]] | None] = ContextVar(
    "shared_state_dicts", default=None
)


class TensorFile(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor: ...


class _Safetensors:
    def __init__(self, handle) -> None:  # a safetensors safe_open handle
        self._fh = handle

    def names(self) -> list[str]:
        return list(self._fh.keys())  # noqa: SIM118 (safe_open is not iterable)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._fh.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._fh.get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has the safetensors dtype {code}, not read here")
        return _SAFETENSORS_DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        return self._fh.get_tensor(name)


class _StateDict:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


@contextmanager
def reading_checkpoint() -> Iterator[None]:
    """Within, ``open_tensor_file`` unpickles each state-dict file once and shares it; the
    shared dicts are dropped when the outermost ``reading_checkpoint()`` exits (a nested one
    joins it). Safetensors files stay lazy and are never kept."""
    if _shared_state_dicts.get() is not None:
        yield
        return
    shared: dict[Path, dict[str, torch.Tensor]] = {}
    token = _shared_state_dicts.set(shared)
    try:
        yield
    finally:
        _shared_state_dicts.reset(token)
        shared.clear()


@contextmanager
def open_tensor_file(file: Path) -> Iterator[TensorFile]:
    """The tensors of ``file`` by name (a clear ``ValueError`` for a file that is neither)."""
    if file.suffix in STATE_DICT_SUFFIXES:
        yield _StateDict(_state_dict(file))
        return
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as fh:
        yield _Safetensors(fh)


def _state_dict(file: Path) -> dict[str, torch.Tensor]:
    shared = _shared_state_dicts.get()
    if shared is None:
        return _load_state_dict(file)
    key = file.resolve()
    if key not in shared:
        shared[key] = _load_state_dict(file)
    return shared[key]


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
