"""Models and data of the EK-FAC benchmark, in plain torch (imported by both sides: ours and
Kronfluence's virtual environment, which does not have influence_pipeline).

* ``transformer``: a GPT-style causal LM (token + positional embeddings, pre-LN blocks with
  ``scaled_dot_product_attention``, MLP, Linear head) on sequences of a fixed random sparse
  Markov chain (structure to learn), trained briefly with Adam.
* ``cnn``: Conv2d → ReLU → Conv2d(stride 2) → ReLU → Conv2d → ReLU → mean pool → Linear on
  3×16×16 images labelled by a random teacher CNN, trained briefly.
* scaling rows: tied-embedding GPTs from about 1M parameters to the GPT-2-small shape
  (12 layers, 768 wide, vocabulary 50,257, 124M parameters) built with torch.nn, untrained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Block(torch.nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.ln2 = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, 4 * d)
        self.out = torch.nn.Linear(4 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class GPT(torch.nn.Module):
    def __init__(
        self, vocab: int, d: int, layers: int, heads: int, max_len: int, tied: bool = False
    ) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(max_len, d)
        self.blocks = torch.nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        if tied:  # GPT-2 ties the output layer to the token embedding
            self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(positions))))


class CNN(torch.nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.c3 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc(h.mean(dim=(2, 3)))


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over positions and examples."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")


def transformer_case(n: int, seq: int = 32, seed: int = 0):
    """(model, x (n, seq) tokens, y next tokens, loss)."""
    vocab = 64
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 3), generator=gen)  # sparse Markov chain
    tokens = torch.empty(n, seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for t in range(seq):
        pick = torch.randint(0, 3, (n,), generator=gen)
        tokens[:, t + 1] = successors[tokens[:, t], pick]
    torch.manual_seed(seed)
    model = GPT(vocab, 64, 2, 4, seq)
    x, y = tokens[:, :-1], tokens[:, 1:]
    _train(model, x, y, lm_loss, steps=60)
    return model.eval(), x, y, lm_loss


def cnn_case(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=gen)
    torch.manual_seed(seed + 1)
    teacher = CNN()
    with torch.no_grad():
        y = teacher(x).argmax(dim=1)
    torch.manual_seed(seed)
    model = CNN()

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, reduction="sum")

    _train(model, x, y, loss, steps=60)
    return model.eval(), x, y, loss


def architecture(case: str) -> torch.nn.Module:
    """The untrained model of a case (weights are loaded from a saved state)."""
    if case == "transformer":
        return GPT(64, 64, 2, 4, 32)
    if case == "cnn":
        return CNN()
    raise ValueError(f"unknown case {case!r}")


def loss_of(case: str):
    if case == "transformer":
        return lm_loss

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, reduction="sum")

    return loss


#: (width, layers, heads, vocabulary) of the scaling rows; the last is GPT-2 small (124M).
SCALING_SHAPES = {
    "1M": (128, 4, 4, 2048),
    "10M": (320, 6, 5, 16384),
    "124M": (768, 12, 12, 50257),
}


def scaling_model(name: str, max_len: int = 1024, seed: int = 0) -> GPT:
    """A tied-embedding GPT of one of :data:`SCALING_SHAPES` (untrained)."""
    d, layers, heads, vocab = SCALING_SHAPES[name]
    torch.manual_seed(seed)
    return GPT(vocab, d, layers, heads, max_len, tied=True).eval()


def _train(model, x, y, loss, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(123)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        opt.zero_grad()
        (loss(model(x[idx]), y[idx]) / 64).backward()
        opt.step()
