"""Brute-force EK-FAC references for the per-layer tests (float64, tiny models).

Independent of the engine's hooks and layouts: per-example gradients come from one
``torch.autograd.grad`` per example on the loss summed over positions; layer matrices
V = [W | b] are read from the parameter gradients here; inverses are dense matrices
blockdiag_g (Q_G ⊗ Q_A) diag(1/(Λ + λ)) (Q_G ⊗ Q_A)ᵀ in the row-major vec(V) layout.
:func:`kronfluence_ekfac` rebuilds the whole EK-FAC from Kronfluence's definitions: A from
the layer inputs seen by a test-local hook (patches unfolded here for Conv2d), G from output
gradients obtained by adding a zero perturbation to the layer output, the eigenvalue
correction from the per-example gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


class TinyGPT(torch.nn.Module):
    """A causal transformer LM: token + positional embeddings, one pre-LN block with
    ``scaled_dot_product_attention``, an MLP and a Linear head."""

    def __init__(self, vocab: int = 7, d: int = 8, heads: int = 2, max_len: int = 6) -> None:
        super().__init__()
        self.d, self.heads = d, heads
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(0.1 * torch.randn(max_len, d))
        self.ln1 = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.ln2 = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, 2 * d)
        self.out = torch.nn.Linear(2 * d, d, bias=False)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        h = self.tok(idx) + self.pos[:t]
        q, k, v = self.qkv(self.ln1(h)).split(self.d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, self.d))
        h = h + self.out(F.gelu(self.fc(self.ln2(h))))
        return self.head(h)


def sequence_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over positions (one example, or a batch: summed)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")


def logits_of(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits  # type: ignore[attr-defined]


def layer_matrix(module: torch.nn.Module, gw: torch.Tensor, gb: torch.Tensor | None):
    """V (G, out_g, in_g [+1]) from the gradients of weight and bias."""
    if isinstance(module, torch.nn.Conv2d):
        groups = module.groups
        w = gw.reshape(groups, gw.shape[0] // groups, -1)
    elif isinstance(module, torch.nn.Linear):
        w = gw[None]
    else:  # Hugging Face Conv1D: weight (in, out)
        w = gw.T[None]
    if gb is None:
        return w
    return torch.cat([w, gb.reshape(w.shape[0], w.shape[1], 1)], dim=-1)


def per_example_matrices(model, loss, x, y, names):
    """{layer: (N, G, out, in)} per-example layer gradients, one backward per example."""
    modules = dict(model.named_modules())
    out = {n: [] for n in names}
    with sdpa_kernel(SDPBackend.MATH):
        for xi, yi in zip(x, y, strict=True):
            value = loss(logits_of(model(xi[None])), yi[None])
            params = []
            for n in names:
                m = modules[n]
                params.append(m.weight)
                if m.bias is not None and m.bias.requires_grad:
                    params.append(m.bias)
            grads = list(torch.autograd.grad(value, params))
            for n in names:
                m = modules[n]
                gw = grads.pop(0)
                gb = grads.pop(0) if m.bias is not None and m.bias.requires_grad else None
                out[n].append(layer_matrix(m, gw, gb))
    return {n: torch.stack(v) for n, v in out.items()}


def dense_inverse(evecs_g, evecs_a, diag, lam):
    """blockdiag over groups of (Q_G ⊗ Q_A) diag(1/(Λ+λ)) (Q_G ⊗ Q_A)ᵀ."""
    blocks = []
    for qg, qa, d in zip(evecs_g, evecs_a, diag, strict=True):
        q = torch.kron(qg, qa)
        blocks.append(q @ torch.diag(1.0 / (d.reshape(-1) + lam)) @ q.T)
    return torch.block_diag(*blocks)


def dense_scores(test_mats, train_mats, inverses):
    """Σ_layers vec(D_test)ᵀ H⁻¹ vec(D_train): (n_test, n_train)."""
    total = 0
    for name, inv in inverses.items():
        a = test_mats[name].flatten(1)
        b = train_mats[name].flatten(1)
        total = total + a @ inv @ b.T
    return total


def _unfold_rows(module, x):
    if isinstance(module, torch.nn.Conv2d):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            pad = 0
        else:
            pad = module.padding
        cols = F.unfold(x, module.kernel_size, module.dilation, pad, module.stride)
        g = module.groups
        return cols.reshape(x.shape[0], g, cols.shape[1] // g, -1).transpose(-1, -2)
    return x.reshape(x.shape[0], 1, -1, x.shape[-1])


def _grad_rows(module, g):
    if isinstance(module, torch.nn.Conv2d):
        groups = module.groups
        return g.reshape(g.shape[0], groups, g.shape[1] // groups, -1).transpose(-1, -2)
    return g.reshape(g.shape[0], 1, -1, g.shape[-1])


def kronfluence_ekfac(model, loss, x, y, names, lam):
    """{layer: dense damped inverse} of EK-FAC with the empirical Fisher."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args, output):
            seen[name] = args[0].detach()
            delta = torch.zeros_like(output, requires_grad=True)
            deltas[name] = delta
            return output + delta

        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    a_sum = dict.fromkeys(names, 0)
    g_sum = dict.fromkeys(names, 0)
    rows = dict.fromkeys(names, 0)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            for xi, yi in zip(x, y, strict=True):  # one example at a time
                value = loss(logits_of(model(xi[None])), yi[None])
                grads = torch.autograd.grad(value, [deltas[n] for n in names])
                for n, g in zip(names, grads, strict=True):
                    m = modules[n]
                    a = _unfold_rows(m, seen[n])[0]  # (G, T, in)
                    if m.bias is not None and m.bias.requires_grad:
                        a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], dim=-1)
                    s = _grad_rows(m, g)[0]  # (G, T, out)
                    a_sum[n] = a_sum[n] + a.transpose(-1, -2) @ a
                    g_sum[n] = g_sum[n] + s.transpose(-1, -2) @ s
                    rows[n] += a.shape[1]
    finally:
        for h in handles:
            h.remove()
    mats = per_example_matrices(model, loss, x, y, names)
    inverses = {}
    for n in names:
        _, qa = torch.linalg.eigh(a_sum[n] / rows[n])
        _, qg = torch.linalg.eigh(g_sum[n] / rows[n])
        rotated = qg.transpose(-1, -2) @ mats[n] @ qa
        diag = (rotated**2).mean(dim=0)
        inverses[n] = dense_inverse(qg, qa, diag, lam)
    return inverses


def pearson_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), math.ulp(1.0)))
