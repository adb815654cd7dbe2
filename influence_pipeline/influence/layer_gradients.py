"""Per-layer input rows and output gradients of one batch, from forward hooks.

One forward pass of a batch keeps, for every factored layer, its input rows ã (B, G, T, in)
and its output tensor; backward passes then give the output gradients s (K, B, G, T, out) of
K "pseudo-losses" at once, never a parameter gradient (the model's ``.grad`` stays as it
is). The per-example layer gradient of pseudo-loss k is Σ_t s_kt ã_tᵀ. A layer called
several times in one forward (shared weights) contributes the rows of every call.

The pseudo-losses (p = softmax of the logits over their last axis, positions t):

* ``"loss"`` (K = 1): the per-example loss ℓᵢ with the true labels, summed over the batch;
  its output gradients give both the empirical Fisher and the training/test gradients.
* ``"sampled"`` (K = 1 per draw, k draws): Σ_t −log p_t[ŷ_t] with ŷ_t ~ p_t, scaled by
  1/√k so that sums of outer products over draws are means.
* ``"exact"`` (K = T·C): one pseudo-loss per (position t, class c), √p_tc·log p_tc with √p_tc
  held constant; Σ_{t,c} of the outer products is the Fisher of the predictive distribution.

Per-example losses follow the engine's convention ℓᵢ = loss(model(xᵢ[None]), yᵢ[None]),
vectorised over the batch with ``torch.func.vmap`` on the loss alone (the model runs on the
whole batch). The default loss, ``F.cross_entropy``, is summed over positions for (B, T, V)
outputs (``ignore_index`` targets count zero).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .finite import all_finite
from .kfac_layers import KfacLayer

LossType = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Largest number of (position, class) pseudo-losses ``fisher="exact"`` accepts per example.
EXACT_FISHER_MAX_OUTPUTS = 1024
#: Pseudo-losses of the exact Fisher back-propagated together (memory: this many gradients
#: of every layer output).
EXACT_FISHER_CHUNK = 64


def model_logits(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, or an object with ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        "EK-FAC needs the model to return a tensor (B, C) / (B, T, V) or an object with a "
        f"`.logits` tensor, got {type(output).__name__}."
    )


def as_model_input(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Move ``x`` to the model's device; floating inputs take its dtype, integers stay."""
    param = next(model.parameters())
    if x.is_floating_point():
        return x.to(device=param.device, dtype=param.dtype)
    return x.to(device=param.device)


def per_example_losses(loss: LossType, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ℓᵢ = loss(logitsᵢ[None], yᵢ[None]) for every example: shape (B,)."""
    if loss is F.cross_entropy:
        if logits.ndim == 2:
            return F.cross_entropy(logits, y, reduction="none")
        flat = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
        )
        return flat.reshape(logits.shape[0], -1).sum(dim=1)

    def one(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss(out[None], target[None])

    return torch.func.vmap(one)(logits, y)


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """``scaled_dot_product_attention`` on its math backend (batched backward passes need
    its vmap rules) and no fused MultiheadAttention inference path (it skips the layers)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


class LayerCapture:
    """Forward hooks that keep each layer's inputs (detached) and outputs of one pass."""

    def __init__(self, layers: OrderedDict[str, KfacLayer]) -> None:
        self.layers = layers
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> LayerCapture:
        self.inputs = {name: [] for name in self.layers}
        self.outputs = {name: [] for name in self.layers}
        for name, layer in self.layers.items():
            self._handles.append(layer.module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            self.inputs[name].append(args[0].detach())
            self.outputs[name].append(output)

        return hook

    def check_called(self) -> None:
        missing = [name for name, calls in self.outputs.items() if not calls]
        if missing:
            raise ValueError(
                f"EK-FAC layers {missing} were not called during the forward pass (a parent "
                "module used their weights directly, or they are unused); leave them out with "
                "modules=."
            )

    def input_rows(self, batch_size: int) -> dict[str, torch.Tensor]:
        rows = {}
        for name, layer in self.layers.items():
            parts = [layer.input_rows(x, batch_size) for x in self.inputs[name]]
            a = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
            if not all_finite(a):
                raise ValueError(
                    f"EK-FAC: the inputs of layer {name!r} contain NaN or inf (check the data "
                    "and the model's earlier layers)."
                )
            rows[name] = a
        return rows

    def output_tensors(self) -> list[torch.Tensor]:
        return [out for name in self.layers for out in self.outputs[name]]

    def output_rows(self, grads: tuple[torch.Tensor, ...], lead: int) -> dict[str, torch.Tensor]:
        rows = {}
        i = 0
        for name, layer in self.layers.items():
            n_calls = len(self.outputs[name])
            parts = [layer.output_rows(g, lead) for g in grads[i : i + n_calls]]
            i += n_calls
            rows[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
        return rows


BatchRows = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def batch_rows(
    model: torch.nn.Module,
    layers: OrderedDict[str, KfacLayer],
    x: torch.Tensor,
    y: torch.Tensor | None,
    source: str,
    *,
    loss: LossType = F.cross_entropy,
    fisher_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Iterator[BatchRows]:
    """Yield (input rows by layer (B, G, T, in), output gradient rows by layer
    (K, B, G, T, out)) for one batch; ``source`` is "loss", "sampled" or "exact" (several
    yields share the input rows: one per draw, or per chunk of exact pseudo-losses)."""
    x = as_model_input(x, model)
    batch_size = x.shape[0]
    context = math_attention() if source == "exact" else contextlib.nullcontext()
    with context, torch.enable_grad(), LayerCapture(layers) as capture:
        logits = model_logits(model(x))
        capture.check_called()
        a = capture.input_rows(batch_size)
        outputs = capture.output_tensors()
        if logits.shape[0] != batch_size:
            raise ValueError(
                f"The model output has shape {tuple(logits.shape)} for a batch of {batch_size}: "
                "EK-FAC needs the batch first."
            )

        def grads(cot: torch.Tensor, batched: bool, retain: bool) -> dict[str, torch.Tensor]:
            result = torch.autograd.grad(
                logits,
                outputs,
                grad_outputs=cot,
                is_grads_batched=batched,
                retain_graph=retain,
                allow_unused=True,
                materialize_grads=True,
            )
            lead = 1 if batched else 0
            rows = capture.output_rows(tuple(r.detach() for r in result), lead)
            return rows if batched else {n: r.unsqueeze(0) for n, r in rows.items()}

        if source == "loss":
            if y is None:
                raise ValueError("Labels are needed for loss gradients.")
            y = y.to(logits.device)
            total = per_example_losses(loss, logits, y).sum()
            result = torch.autograd.grad(total, outputs, allow_unused=True, materialize_grads=True)
            g = capture.output_rows(tuple(r.detach() for r in result), 0)
            yield a, {n: r.unsqueeze(0) for n, r in g.items()}
            return
        with torch.no_grad():
            p = torch.softmax(logits.detach(), dim=-1)
        if source == "sampled":
            flat = p.reshape(-1, p.shape[-1])
            scale = fisher_samples**-0.5
            for draw in range(fisher_samples):
                labels = torch.multinomial(flat, 1, generator=generator).squeeze(1)
                cot = flat.clone()
                cot[torch.arange(flat.shape[0], device=flat.device), labels] -= 1.0
                yield a, grads((cot * scale).reshape(p.shape), False, draw < fisher_samples - 1)
            return
        if source != "exact":
            raise ValueError(f"Unknown gradient source {source!r}.")
        pos = p.reshape(batch_size, -1, p.shape[-1])  # (B, T, C)
        n_pos, n_classes = pos.shape[1], pos.shape[2]
        total_outputs = n_pos * n_classes
        if total_outputs > EXACT_FISHER_MAX_OUTPUTS:
            raise ValueError(
                f"fisher='exact' takes one backward pass per output entry: the model gives "
                f"{n_pos} position(s) × {n_classes} classes = {total_outputs} per example, more "
                f"than {EXACT_FISHER_MAX_OUTPUTS}. Use fisher='sampled' (with fisher_samples=k) "
                "or fisher='empirical'."
            )
        root = pos.sqrt()
        for start in range(0, total_outputs, EXACT_FISHER_CHUNK):
            idx = torch.arange(
                start, min(start + EXACT_FISHER_CHUNK, total_outputs), device=p.device
            )
            t_idx, c_idx = idx // n_classes, idx % n_classes
            k = len(idx)
            cot = torch.zeros(k, batch_size, n_pos, n_classes, dtype=p.dtype, device=p.device)
            kk = torch.arange(k, device=p.device)
            # √p_tc (e_c − p_t) at position t, zero elsewhere
            weight = root[:, t_idx, c_idx].T  # (k, B)
            cot[kk, :, t_idx, :] = -weight[:, :, None] * pos[:, t_idx, :].transpose(0, 1)
            cot[kk, :, t_idx, c_idx] += weight
            last = start + EXACT_FISHER_CHUNK >= total_outputs
            yield a, grads(cot.reshape(k, *logits.shape), True, not last)
