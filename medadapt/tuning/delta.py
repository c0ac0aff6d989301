"""Compact fine-tuned models: a delta against the foundation model, applied back bit-exactly.

A delta stores only what fine-tuning changed in the trained model's state dict (before ``finalize``, so a
LoRA model is stored as its low-rank factors, not as dense merged kernels):

- a tensor that did not change: nothing;
- a tensor with few changed entries (sparse methods: DGST, DRST, SGST, ...): flat indices + values;
- a tensor that changed densely or is new (heads, LoRA factors, adapters): the tensor;
- a key that aliases an earlier one (the same tensor under two names: nnU-Net's conv blocks list each conv and
  norm again in ``all_modules``, and its decoder holds the encoder, so a PlainConvUNet state dict names most
  tensors two to four times): the earlier key's entry object itself, which ``torch.save`` stores once.

Sizes: ``torch.save`` stores each distinct tensor storage once, as its own zip record (about 300 bytes of
headers and 64-byte alignment besides the data). A tensor is stored sparsely only when the index and value
records together cost less than the one record of the whole tensor, so a densely changed tensor never costs
more than storing it whole, and the delta of a dense (``full``) run is the size of the model's ``weights.pt``
plus a few hundred bytes of metadata. (Cloning each key's tensor separately, as the first version did, stored
every aliased tensor two to four times: 4.5 MB against 1.4 MB for the cpu-small preset.)
The format is unchanged: a shared entry is an ordinary entry that two keys point to, so deltas written before
and after read and apply alike.

``apply_delta(foundation_state, delta)`` rebuilds the trained state dict exactly (values are copied, never
recomputed), and :func:`load_delta_model` rebuilds the final model: foundation network, the strategy's
``prepare``, the applied state, the strategy's ``finalize``.

Keys are matched to the foundation's after removing what ``torch.nn.utils.parametrize`` inserts
(``conv.parametrizations.weight.original`` is the foundation's ``conv.weight``).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from medadapt.errors import MedadaptError
from medadapt.utils.atomic import atomic_torch_save

FORMAT = "medadapt-delta/1"


def foundation_key(key: str) -> str:
    """The foundation state-dict key a trained key corresponds to."""
    return key.replace(".parametrizations.", ".").replace(".original", "")


def make_delta(foundation: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
               meta: dict[str, Any] | None = None) -> dict[str, Any]:
    entries: dict[str, dict[str, Any]] = {}
    first_of: dict[tuple, str] = {}  # storage identity -> the first key holding that tensor
    for key, raw in trained.items():
        ident = _identity(raw)
        first = first_of.setdefault(ident, key)
        if first != key and _same_base(foundation, first, key, entries[first]):
            entries[key] = entries[first]  # the same object: pickled and stored once, applied alike
            continue
        value = raw.detach().cpu()
        base = foundation.get(foundation_key(key))
        if base is None or base.shape != value.shape or base.dtype != value.dtype:
            entries[key] = {"full": value.clone()}
            continue
        base = base.detach().cpu()
        if torch.equal(base, value):
            entries[key] = {}
            continue
        changed = (base != value).flatten().nonzero().flatten()
        index_dtype = torch.int32 if value.numel() < 2 ** 31 else torch.int64
        sparse = (_stored_bytes(changed.numel() * index_dtype.itemsize)
                  + _stored_bytes(changed.numel() * value.element_size()))
        if sparse < _stored_bytes(value.numel() * value.element_size()):
            entries[key] = {"index": changed.to(index_dtype), "values": value.flatten()[changed].clone()}
        else:
            entries[key] = {"full": value.clone()}
    return {"format": FORMAT, "meta": meta or {}, "entries": entries}


#: what ``torch.save`` spends on one tensor storage beyond its data, rounded up: the zip record's local header and
#: central-directory entry with the record name, the padding that aligns the data to 64 bytes, and the
#: tensor's reference in the pickle (measured: 250-320 bytes)
_RECORD_BYTES = 320


def _stored_bytes(nbytes: int) -> int:
    """About what one tensor of ``nbytes`` data bytes costs in a ``torch.save`` file."""
    return _RECORD_BYTES + -(-int(nbytes) // 64) * 64


def _identity(t: torch.Tensor) -> tuple:
    """Equal for two state-dict entries that are the same tensor (the same memory, viewed the same way)."""
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _same_base(foundation: dict[str, torch.Tensor], first: str, key: str, entry: dict[str, Any]) -> bool:
    """Whether ``key`` (an alias of ``first`` in the trained state) can share ``first``'s entry: always for a
    whole tensor; for an unchanged or sparse entry only if the foundation holds the same values under both."""
    if "full" in entry:
        return True
    a, b = foundation.get(foundation_key(first)), foundation.get(foundation_key(key))
    if a is None or b is None:
        return False
    return a is b or _identity(a) == _identity(b) or (
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach().cpu(), b.detach().cpu()))


def apply_delta(foundation: dict[str, torch.Tensor], delta: dict[str, Any]) -> dict[str, torch.Tensor]:
    if delta.get("format") != FORMAT:
        raise MedadaptError(f"not a {FORMAT} delta; create it with medadapt finetune")
    state: dict[str, torch.Tensor] = {}
    for key, entry in delta["entries"].items():
        if "full" in entry:
            state[key] = entry["full"].clone()
            continue
        base = foundation.get(foundation_key(key))
        if base is None:
            raise MedadaptError(f"delta needs foundation tensor {foundation_key(key)!r}, which the foundation "
                                "model lacks; apply the delta to the model it was made from")
        value = base.detach().cpu().clone()
        if "index" in entry:
            value.view(-1)[entry["index"].long()] = entry["values"]
        state[key] = value
    return state


def delta_size_bytes(delta: dict[str, Any]) -> int:
    buf = io.BytesIO()
    torch.save(delta, buf)
    return buf.tell()


def save_delta(path: str | Path, delta: dict[str, Any]) -> None:
    atomic_torch_save(path, delta)


def load_delta_model(foundation_folder, delta: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the fine-tuned model from its foundation model folder and a delta made by ``medadapt finetune``."""
    from medadapt.models.network import build_network
    from medadapt.tuning.registry import strategy_from_record

    meta = delta["meta"]
    foundation = foundation_folder.load_network()
    spec = foundation_folder.network.with_classes(int(meta["num_classes"]))
    network = build_network(spec)
    strategy = strategy_from_record(meta["strategy"])
    network = strategy.prepare(network)
    network.load_state_dict(apply_delta(foundation.state_dict(), delta))
    return strategy.finalize(network)
