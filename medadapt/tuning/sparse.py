"""Gradient sparsification training: DGST (Luo et al., the DGST paper, Eq. 3-5).

At every iteration N, for every convolution and transposed-convolution kernel C_k (all weights that produce
one output channel) only the gamma entries with the largest |g^N| are updated (Eq. 4); biases and
normalisation affine parameters are always updated, and so are the segmentation heads (the 1x1x1 output
convolutions: they are the task-specific classifier, which every baseline of the paper trains). Every other
entry must not move at all (Eq. 5).

Transformers (SwinUNETR): a ``Linear`` layer's kernel C_o is its weight's output row ``weight[o, :]`` (the
weights that produce output feature o), so attention ``qkv``/``proj``, MLP and patch-merging weights are
sparse like convolution kernels. Parameters that belong to no conv or Linear weight -- biases, norm affine
parameters, the network's declared extra biases (Swin's relative-position bias tables), the heads -- are
updated in full (docs/methods.md).

How the mask is enforced (follows the paper, not the released implementation): masking the gradient alone
is not enough with nnU-Net's optimiser, because SGD's momentum buffer and weight decay would still move
weights whose gradient was zeroed. The released LN-Seg-FM code masks only the gradient (and, as
published, never returns the masks it builds). Here a step pre-hook zeroes the unselected gradient entries
and snapshots the weights and their optimizer state; a step post-hook puts the unselected entries of both
back. So the update of every unselected entry is exactly zero, and its optimizer state (momentum, Adam
moments) is that of the last iteration in which it was selected, as if it had sat out this iteration. This
works around any ``torch.optim`` optimizer. The gradient norm used for clipping is computed by the training
loop before selection, on the full gradient, as nnU-Net clips it; clipping scales all entries alike, so it
does not change which entries are selected.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medadapt.errors import MedadaptError
from medadapt.models.parts import is_conv, is_linear
from medadapt.tuning.method import Method, Option
from medadapt.tuning.base import Strategy
from medadapt.utils import seeds


def kernel_topk_indices(scores: torch.Tensor, gamma: int, out_dim: int = 0) -> torch.Tensor | None:
    """Flat indices (into ``scores``) of the ``gamma`` largest scores of every output channel's kernel.

    A ``topk`` (not a sort) over each kernel's flattened entries: linear work and memory in the number of
    weights. Returns None when ``gamma`` covers whole kernels (everything selected).
    """
    moved = scores.movedim(out_dim, 0)
    n_out = moved.shape[0]
    per_kernel = moved[0].numel()
    k = min(int(gamma), per_kernel)
    if k >= per_kernel:
        return None
    idx = moved.reshape(n_out, -1).topk(k, dim=1, sorted=False).indices  # (out, k) into each kernel
    rows = torch.arange(n_out, device=scores.device).unsqueeze(1)
    if out_dim == 0:
        return (rows * per_kernel + idx).flatten()
    # kernel o of a transposed conv is weight[:, o]: entry j of it is (i, rest) = divmod(j, rest_size)
    rest = scores[0, 0].numel()
    i, r = idx // rest, idx % rest
    return (i * scores.shape[1] * rest + rows * rest + r).flatten()


def indices_to_mask(indices: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if indices is None:
        return torch.ones_like(like, dtype=torch.bool)
    mask = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    mask[indices] = True
    return mask.view(like.shape)


def output_channel_dim(module: nn.Module) -> int:
    """Dimension of a weight that indexes output channels (0 for ConvNd and Linear, 1 for ConvTransposeNd)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            raise NotImplementedError("grouped transposed convolutions are not supported by sparse training")
        return 1
    return 0


class SparseUpdateStrategy(Strategy):
    """Base of gamma-per-kernel sparse training; subclasses decide which entries (``select``)."""

    name = "sparse"
    freezes = True

    def __init__(self, gamma: int = 1):
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise MedadaptError(f"{self.name}: gamma {gamma!r} must be a positive integer (entries per kernel)")
        self.gamma = gamma
        self._sparse: list[tuple[nn.Parameter, int]] = []
        self.last_selection: dict[int, torch.Tensor | None] = {}
        self._pending: list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor | None, dict]] = []

    # -- interface -------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        heads = {id(p) for p in self.dense_parameters(model)}  # the heads (and a new decoder) train densely
        self._sparse = [
            (m.weight, output_channel_dim(m))
            for m in model.modules()
            if (is_conv(m) or is_linear(m)) and m.weight is not None and id(m.weight) not in heads
        ]
        return model

    def updated_per_step(self, model: nn.Module) -> int:
        sparse = {id(w) for w, _ in self._sparse}
        dense = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in sparse)
        budget = sum(min(self.gamma, _kernel_size(w, d)) * w.shape[d] for w, d in self._sparse)
        return dense + budget

    def attach(self, optimizer) -> None:
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "gamma": self.gamma, **self.decoder_record()}

    def select(self, weight: nn.Parameter, out_dim: int) -> torch.Tensor | None:
        """Flat indices of the entries of ``weight`` to update in this step (None: all of them)."""
        raise NotImplementedError

    def selection_mask(self, weight: nn.Parameter) -> torch.Tensor:
        """Boolean mask of what the last step selected in ``weight`` (for inspection and tests)."""
        return indices_to_mask(self.last_selection[id(weight)], weight)

    # -- enforcement -----------------------------------------------------------------------------------
    # Index-based, to touch memory as little as possible: the pre-hook keeps the selected gradient entries,
    # zeroes the gradient and puts them back, and snapshots the weight and its optimizer state; the post-hook
    # keeps the selected entries' new values, copies the snapshot back and puts them in. Two passes over
    # each tensor and no boolean masks.
    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        self._pending.clear()
        for weight, out_dim in self._sparse:
            if weight.grad is None:
                continue
            idx = self.select(weight, out_dim)
            if idx is None:  # gamma covers whole kernels: nothing to enforce
                self._pending.append((weight, None, None, {}))
                continue
            if not weight.grad.is_contiguous():
                weight.grad = weight.grad.contiguous()
            _restore_except(weight.grad, None, idx)  # the optimizer sees only the selected gradient entries
            state = optimizer.state.get(weight, {})
            saved_state = {k: v.clone() for k, v in state.items()
                           if torch.is_tensor(v) and v.shape == weight.shape}
            self._pending.append((weight, idx, weight.detach().clone(), saved_state))

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        self.last_selection = {id(weight): idx for weight, idx, _, _ in self._pending}
        for weight, idx, old, saved_state in self._pending:
            if idx is None:
                continue
            _restore_except(weight, old, idx)
            for key, value in optimizer.state.get(weight, {}).items():
                if torch.is_tensor(value) and value.shape == weight.shape:
                    # state created by this very step (e.g. the first momentum buffer) starts from zero
                    before = saved_state.get(key)
                    _restore_except(value, before, idx)
        self._pending.clear()


def _restore_except(current: torch.Tensor, old: torch.Tensor | None, idx: torch.Tensor) -> None:
    """``current`` = ``old`` (zeros if None) everywhere but at the flat indices ``idx``, which keep their value."""
    flat = current.view(-1) if current.is_contiguous() else current.contiguous().view(-1)
    kept = flat[idx]
    if old is None:
        flat.zero_()
    else:
        flat.copy_(old.reshape(-1))
    flat[idx] = kept
    if flat.data_ptr() != current.data_ptr():
        current.copy_(flat.view(current.shape))


def _kernel_size(weight: torch.Tensor, out_dim: int) -> int:
    return weight[0].numel() if out_dim == 0 else weight[:, 0].numel()


class DGST(SparseUpdateStrategy):
    """Dynamic Gradient Sparsification Training: top-gamma |gradient| per kernel, re-chosen every step."""

    name = "dgst"

    def select(self, weight: nn.Parameter, out_dim: int) -> torch.Tensor | None:
        return kernel_topk_indices(weight.grad.abs(), self.gamma, out_dim)


class DRST(SparseUpdateStrategy):
    """Dynamic Random Sparsification Training (the paper's ablation): gamma random entries per kernel, re-drawn
    every step, from a seeded generator (its state is checkpointed, so a resumed run draws the same entries).

    The scores are drawn where the weights are (a generator on the weights' device, created at the first step
    and seeded on the ``drst`` stream of ``seed``, :mod:`medadapt.utils.seeds`): no host round trip per step. CPU and CUDA generators give different streams for
    one seed, so a run is resumed on the device type it was started on (refused otherwise)."""

    name = "drst"

    def __init__(self, gamma: int = 1, seed: int = 0):
        super().__init__(gamma)
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending_state: dict[str, Any] | None = None

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            generator = seeds.torch_generator(self.seed, "drst", device=device)
            if self._pending_state is not None:
                saved = self._pending_state.get("device", "cpu")
                if saved != device.type:
                    raise MedadaptError(f"DRST: this run's random selection was drawn on {saved}; resume it on "
                                        f"{saved} (now: {device.type}), or start a new run")
                generator.set_state(self._pending_state["generator"])
                self._pending_state = None
            self._generator = generator
        return self._generator

    def select(self, weight: nn.Parameter, out_dim: int) -> torch.Tensor | None:
        scores = torch.rand(weight.shape, generator=self._generator_for(weight.device), device=weight.device)
        return kernel_topk_indices(scores, self.gamma, out_dim)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        if self._generator is None:  # no step yet: the state is the seed's (or the one waiting to be loaded)
            return dict(self._pending_state) if self._pending_state is not None else {}
        return {"generator": self._generator.get_state(), "device": self._generator.device.type}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self._pending_state = {"generator": state["generator"], "device": state.get("device", "cpu")}
            self._generator = None


class SGST(SparseUpdateStrategy):
    """Static Gradient Sparsification Training (the paper's ablation, Table 2): the top-gamma entries per kernel
    of the gradient accumulated over one calibration pass before training, fixed afterwards.

    The score is ``|sum_b g_b|``, the absolute value of the gradient summed over the calibration batches b (the
    gradient of the total calibration loss), not ``sum_b |g_b|``. Why: the paper selects SGST's entries "via
    initial accumulated gradients" and ranks them, as DGST does, by Eq. 4's ``|g|`` with Eq. 3's
    ``g = grad L(D_d)``, the gradient of the loss on the downstream data; accumulating gradients over batches
    (backward passes without zeroing, as the paper's cited static method GPS [27] does before ranking its
    entries by absolute value) gives ``sum_b g_b = grad sum_b L_b``, and Eq. 4 then takes its absolute value.
    The released LN-Seg-FM code has no SGST to compare with (only DGST and DRST). The difference matters:
    ``sum |g|`` also ranks high entries whose gradients cancel across cases (no agreed direction), ``|sum g|``
    does not. Each batch contributes the training loss's gradient unclipped (clipping would re-weight batches).

    The calibration batches are defined once for every training loop in
    :func:`medadapt.data.sampling.calibration_plan` (one unaugmented foreground patch per training case, in
    batches of the loop's batch size); medadapt's engine and nnU-Net's trainer (``medadapt.nnunet``) both use it.
    """

    name = "sgst"
    needs_calibration = True

    def __init__(self, gamma: int = 1):
        super().__init__(gamma)
        self._indices: list[torch.Tensor | None] | None = None
        self.calibration_batches = 0  # how many batches the last calibration pass had

    def calibrate(self, model, loss_fn, batches) -> None:
        totals = [torch.zeros_like(w) for w, _ in self._sparse]
        saved = [p.grad for p in model.parameters()]
        count = 0
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for total, (w, _) in zip(totals, self._sparse):
                if w.grad is not None:
                    total.add_(w.grad)  # signed: the score is |sum of gradients|
            count += 1
        model.zero_grad(set_to_none=True)
        for p, g in zip(model.parameters(), saved):
            p.grad = g
        if count == 0:
            raise MedadaptError("SGST: the calibration pass got no batches (no training cases?)")
        self.calibration_batches = count
        self._indices = [kernel_topk_indices(t.abs_(), self.gamma, d) for t, (_, d) in zip(totals, self._sparse)]
        self._index = {id(w): i for i, (w, _) in enumerate(self._sparse)}

    def select(self, weight: nn.Parameter, out_dim: int) -> torch.Tensor | None:
        if self._indices is None:
            raise RuntimeError("SGST: call calibrate() before training (medadapt's engine does)")
        return self._indices[self._index[id(weight)]]

    def state_dict(self) -> dict[str, Any]:
        return {"indices": self._indices}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        indices = state.get("indices")
        if indices is not None:
            self._indices = [i.to(w.device) if i is not None else None for i, (w, _) in zip(indices, self._sparse)]
            self._index = {id(w): i for i, (w, _) in enumerate(self._sparse)}


#: γ, shared by the three sparse methods (one --gamma flag)
GAMMA = Option("gamma", int, 1, "entries updated per kernel and iteration, as the paper", flag="--gamma", minimum=1)

METHODS = (
    Method(DRST, summary="gamma random entries per kernel each step + biases, norms, heads", display="DRST",
           options=(GAMMA,), seeded=True),
    Method(SGST, summary="fixed top-gamma entries per kernel by |accumulated gradient| + biases, norms, heads",
           display="SGST", options=(GAMMA,)),
    Method(DGST, summary="top-gamma entries by abs. gradient per kernel, each step + biases, norms, heads",
           display="DGST", options=(GAMMA,)),
)
