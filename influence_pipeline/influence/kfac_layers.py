"""The layers K-FAC factors, and the rows (example, position) they see.

A supported layer computes, for every position t of an example, y_t = W ã_t, with ã_t its
input row (a ones column appended when the layer has a trainable bias, ã = [a; 1]) and
V = [W | b] its parameters as an (out, in + 1) matrix. The per-example gradient of the layer
is the sum over positions Σ_t g_t ã_tᵀ, g_t = ∂ℓ/∂y_t. Every layer is handled as a stack of
G independent Kronecker blocks (G = 1 but for grouped convolutions), so rows, factors and
gradients carry a group axis: input rows (B, G, T, in_g), output rows (B, G, T, out_g),
V (G, out_g, in_g).

* ``torch.nn.Linear`` on (B, *, in): the positions are every index of ``*`` (T = their
  product, 1 for a plain (B, in) input).
* ``torch.nn.Conv2d``: the positions are the output pixels; the input rows are the patches
  ``F.unfold`` builds (stride, padding, dilation; non-zero padding modes and ``"same"`` are
  padded first), the weight (out, in/G, kh, kw) is read as (out, in/G·kh·kw). Groups are a
  block-diagonal treatment: group g's output channels see only its input channels, so each
  group is its own Kronecker block (out/G × in/G·kh·kw).
* Hugging Face ``Conv1D`` (GPT-2): y = x @ W + b with the weight stored (in, out), so
  V = [Wᵀ | b]; positions as for Linear. Recognised by duck typing (class name ``Conv1D``
  with an ``nf`` attribute), so ``transformers`` is not needed.

The flat layout of a layer's gradient is pyDVL's: each trainable parameter flattened
row-major in ``named_parameters()`` order (weight, then bias).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ModuleSelector = str | type[torch.nn.Module]


class NotImplementedLayerRepresentationException(ValueError):
    """No layer of the model (or of ``modules=``) can be factored by EK-FAC."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


def _is_hf_conv1d(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
    )


def layer_kind(module: torch.nn.Module) -> str | None:
    """ "linear", "conv2d", "conv1d" (Hugging Face) or None for an unsupported module."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Conv2d):
        return "conv2d"
    if _is_hf_conv1d(module):
        return "conv1d"
    return None


@dataclass
class KfacLayer:
    """One factored layer: its module, shape per group and the maps between layouts."""

    name: str
    module: torch.nn.Module
    kind: str
    groups: int
    out_features: int  # per group
    in_features: int  # per group, without the bias column (in·kh·kw for Conv2d)
    has_bias: bool

    @classmethod
    def of(cls, name: str, module: torch.nn.Module) -> KfacLayer:
        kind = layer_kind(module)
        bias = getattr(module, "bias", None)
        has_bias = isinstance(bias, torch.Tensor) and bias.requires_grad
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        if kind == "linear":
            return cls(name, module, kind, 1, weight.shape[0], weight.shape[1], has_bias)
        if kind == "conv2d":
            groups = int(module.groups)  # type: ignore[arg-type]
            return cls(
                name,
                module,
                kind,
                groups,
                weight.shape[0] // groups,
                int(weight[0].numel()),
                has_bias,
            )
        if kind == "conv1d":
            return cls(name, module, kind, 1, weight.shape[1], weight.shape[0], has_bias)
        raise ValueError(f"Module {name!r} ({type(module).__name__}) is not a supported layer.")

    @property
    def parameter_names(self) -> list[str]:
        names = [f"{self.name}.weight" if self.name else "weight"]
        if self.has_bias:
            names.append(f"{self.name}.bias" if self.name else "bias")
        return names

    @property
    def in_dim(self) -> int:
        """Width of an input row: in_features plus the bias column."""
        return self.in_features + int(self.has_bias)

    @property
    def n_parameters(self) -> int:
        return self.groups * self.out_features * self.in_dim

    # -------------------------------------------------------------- rows
    def input_rows(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The layer input as rows (B, G, T, in_dim)."""
        if x.ndim < 2 or x.shape[0] != batch_size:
            raise ValueError(
                f"Layer {self.name!r} received an input of shape {tuple(x.shape)}; EK-FAC "
                f"needs the batch ({batch_size} examples) first (use batch_first=True)."
            )
        if self.kind == "conv2d":
            rows = self._patches(x)
        else:
            rows = x.reshape(batch_size, 1, -1, x.shape[-1])
        if self.has_bias:
            ones = torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype, device=rows.device)
            rows = torch.cat([rows, ones], dim=-1)
        return rows

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        assert isinstance(m, torch.nn.Conv2d)
        padding = m.padding
        if isinstance(padding, str) or m.padding_mode != "zeros":
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        b, _, positions = cols.shape
        return cols.reshape(b, self.groups, self.in_features, positions).transpose(-1, -2)

    def output_rows(self, grad: torch.Tensor, lead: int = 0) -> torch.Tensor:
        """Output gradients (*lead, B, ...) as rows (*lead, B, G, T, out_g)."""
        shape = grad.shape[: lead + 1]
        if self.kind == "conv2d":
            g = grad.reshape(*shape, self.groups, self.out_features, -1)
            return g.transpose(-1, -2)
        return grad.reshape(*shape, 1, -1, grad.shape[-1])

    # -------------------------------------------------------------- layouts
    def flat_to_matrix(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat gradients (K, P_layer) → V (K, G, out_g, in_dim)."""
        k, g, o, i = flat.shape[0], self.groups, self.out_features, self.in_features
        n_weight = g * o * i
        weight = flat[:, :n_weight]
        if self.kind == "conv1d":
            w = weight.reshape(k, i, o).transpose(1, 2).reshape(k, 1, o, i)
        else:
            w = weight.reshape(k, g, o, i)
        if not self.has_bias:
            return w
        return torch.cat([w, flat[:, n_weight:].reshape(k, g, o, 1)], dim=-1)

    def matrix_to_flat(self, matrix: torch.Tensor) -> torch.Tensor:
        """V (K, G, out_g, in_dim) → flat gradients (K, P_layer)."""
        k, i = matrix.shape[0], self.in_features
        w = matrix[..., :i]
        weight = w.transpose(-1, -2).reshape(k, -1) if self.kind == "conv1d" else w.reshape(k, -1)
        if not self.has_bias:
            return weight
        return torch.cat([weight, matrix[..., i].reshape(k, -1)], dim=1)


def _owners(model: torch.nn.Module) -> dict[int, list[str]]:
    """id(parameter) → names of every module that holds it (tied weights have several)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(name)
    return owners


def _default_exclusion(
    name: str, module: torch.nn.Module, model: torch.nn.Module, owners: dict[int, list[str]]
) -> str | None:
    """Why a supported layer is left out of the default selection (None: it is kept)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if not weight.requires_grad:
        return "frozen weight"
    shared = [o for o in owners.get(id(weight), []) if o != name]
    if shared:
        return f"weight shared with {shared[0]!r} (tied)"
    parent_name = name.rsplit(".", 1)[0] if "." in name else ""
    parent = model.get_submodule(parent_name) if name else None
    if isinstance(parent, torch.nn.MultiheadAttention):
        return "its parent MultiheadAttention uses the weight without calling the layer"
    return None


def select_layers(
    model: torch.nn.Module, modules: Sequence[ModuleSelector] | None = None
) -> tuple[OrderedDict[str, KfacLayer], list[str]]:
    """The layers EK-FAC factors and the trainable parameters it leaves out.

    ``modules``: None for every supported layer with a trainable weight (tied weights and
    MultiheadAttention's ``out_proj`` excepted), or names (a layer, or a container whose
    supported layers are all taken) and/or layer types. Raises
    :class:`NotImplementedLayerRepresentationException` when nothing is selected.
    """
    owners = _owners(model)
    named = dict(model.named_modules())
    chosen: OrderedDict[str, KfacLayer] = OrderedDict()
    if modules is None:
        for name, module in named.items():
            if layer_kind(module) is None:
                continue
            reason = _default_exclusion(name, module, model, owners)
            if reason is None:
                chosen[name] = KfacLayer.of(name, module)
            elif module.weight.requires_grad:
                logger.info("EK-FAC leaves out layer %r: %s.", name, reason)
    else:
        if isinstance(modules, (str, type)):
            modules = [modules]
        wanted: set[str] = set()
        for selector in modules:
            wanted |= _resolve_selector(model, named, selector)
        for name, module in named.items():  # model order
            if name in wanted:
                chosen[name] = KfacLayer.of(name, module)
    if not chosen:
        trainable = sorted(
            {
                f"{n or '<root>'} ({type(m).__name__})"
                for n, m in named.items()
                if any(p.requires_grad for p in m.parameters(recurse=False))
            }
        )
        raise NotImplementedLayerRepresentationException(
            "EK-FAC found no supported layer (torch.nn.Linear, torch.nn.Conv2d, Hugging Face "
            f"Conv1D with a trainable weight) in modules={modules!r}; the model's modules with "
            f"trainable parameters are: {', '.join(trainable) or 'none'}."
        )
    taken = {n for layer in chosen.values() for n in layer.parameter_names}
    excluded = [n for n, p in model.named_parameters() if p.requires_grad and n not in taken]
    if excluded:
        logger.info(
            "EK-FAC leaves out %d trainable parameters (not in a factored layer): %s",
            len(excluded),
            ", ".join(excluded),
        )
    return chosen, excluded


def _resolve_selector(
    model: torch.nn.Module, named: dict[str, torch.nn.Module], selector: ModuleSelector
) -> set[str]:
    if isinstance(selector, type):
        if not issubclass(selector, torch.nn.Module):
            raise TypeError(f"modules= takes module names or types, got the type {selector!r}.")
        found = {
            n
            for n, m in named.items()
            if isinstance(m, selector) and layer_kind(m) is not None and m.weight.requires_grad
        }
        if not found:
            raise ValueError(
                f"modules= names the type {selector.__name__}, but the model has no supported "
                "layer (Linear, Conv2d, Hugging Face Conv1D) of that type with a trainable weight."
            )
        return found
    if not isinstance(selector, str):
        raise TypeError(f"modules= takes module names or types, got {selector!r}.")
    if selector not in named:
        raise ValueError(
            f"modules= names {selector!r}, which is not a module of the model; its modules "
            f"are: {[n for n in named if n][:40]}."
        )
    module = named[selector]
    if layer_kind(module) is not None:
        if not module.weight.requires_grad:
            raise ValueError(f"modules= names layer {selector!r}, whose weight is frozen.")
        return {selector}
    prefix = f"{selector}." if selector else ""
    found = {
        n
        for n, m in named.items()
        if n.startswith(prefix) and layer_kind(m) is not None and m.weight.requires_grad
    }
    if not found:
        raise NotImplementedLayerRepresentationException(
            f"modules= names {selector!r} ({type(module).__name__}), which neither is nor "
            "contains a supported layer (Linear, Conv2d, Hugging Face Conv1D) with a trainable "
            "weight."
        )
    return found
