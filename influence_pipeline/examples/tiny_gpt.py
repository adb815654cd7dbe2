"""A GPT-style example: a byte-level causal transformer trained on Python's own docstrings,
and which training sequences made it predict held-out text.

* **Corpus** (no download): the docstrings of a fixed list of standard-library modules
  and of their public classes and functions, as this interpreter ships them, joined in a
  fixed order (:func:`load_corpus`; its digest keys the cached model, so another Python
  version gives another corpus and another checkpoint). Byte-level tokens (vocabulary
  256): decoding is ``bytes(ids).decode()``.
* **Sequences**: the text cut into windows of ``seq_len + 1`` bytes; x is a window's first
  ``seq_len`` bytes and y the next byte at each position. A seeded permutation holds out
  ``n_test`` windows as queries (:func:`build_sequences`).
* **Model** (:class:`TinyGPT`): token and position embeddings, pre-LayerNorm blocks of
  causal self-attention (``torch.nn.functional.scaled_dot_product_attention``, ``is_causal``)
  and a GELU MLP, a final LayerNorm and an untied ``nn.Linear`` head. The default
  (d_model 256, 3 blocks, 4 heads) has 2.5M parameters, 2.4M of them in ``nn.Linear``
  layers, which EK-FAC factors; embeddings and LayerNorms are left out (logged).
* **Training** (:func:`train`): AdamW on the mean next-byte cross-entropy, seeded, cached
  like the digits example's model (:func:`cached_checkpoint`). Measured (``python -m
  influence_pipeline.examples.tiny_gpt``, 2 shared CPU cores under a load of ~5, so
  wall times are high): 200 steps in 777 s wall, held-out loss 2.43 nats per byte (ln 256
  = 5.55 untrained); attribution of 16 held-out windows to 5,500 training windows 1,309 s
  wall, of which the EK-FAC fit ~1,245 s, rank-32 query factors 2.3 s (26 MB against
  156 MB dense) and scoring the 4 shards 58 s; peak RSS 0.98 GB.
* **Attribution** (:func:`attribute`): EK-FAC with the sampled (or empirical) Fisher, the
  per-example loss summed over positions (the engine's convention for (B, T, V) outputs),
  per-layer scores, and compressed (rank-r) query factors stored in an
  :class:`~influence_pipeline.store.InfluenceStore` and scored shard by shard through its
  writer; :func:`describe_top_k` turns the store's top-k table into readable text.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .digits import default_cache_dir, save_state, staged_files

#: Standard-library modules whose docstrings make the corpus (in this order).
CORPUS_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "doctest", "email", "enum", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "http.client", "imaplib", "inspect", "io", "ipaddress", "json", "locale", "logging",
    "mailbox", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest",
    "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
)  # fmt: skip
VOCAB = 256


# ---------------------------------------------------------------------- corpus
def load_corpus(modules: Sequence[str] = CORPUS_MODULES, max_bytes: int | None = None) -> str:
    """Docstrings of ``modules`` and of their public classes and functions (sorted by
    name), ASCII only, separated by blank lines; at most ``max_bytes`` when given."""
    parts: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module this build of Python lacks (e.g. sqlite3)
            continue
        docs = [inspect.getdoc(module)]
        with warnings.catch_warnings():  # deprecated aliases (typing.io) warn when read
            warnings.simplefilter("ignore", DeprecationWarning)
            for attr in sorted(vars(module)):
                obj = vars(module)[attr]
                if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                if inspect.isclass(obj) or inspect.isfunction(obj):
                    docs.append(inspect.getdoc(obj))
        for doc in docs:
            if doc:
                parts.append(doc.encode("ascii", "ignore").decode().strip())
    text = "\n\n".join(p for p in parts if p) + "\n"
    return text if max_bytes is None else text[:max_bytes]


def encode(text: str) -> torch.Tensor:
    """Byte-level token ids (int64)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def decode(ids: torch.Tensor | np.ndarray | Sequence[int]) -> str:
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    return bytes(int(v) for v in values).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Sequences:
    """Training and held-out windows: x (n, seq_len) and y (n, seq_len) int64 (y is x
    shifted by one byte); ids are window indices in the corpus (window i starts at byte
    i · seq_len)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    train_ids: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_ids: torch.Tensor
    seq_len: int


def build_sequences(text: str, seq_len: int = 64, n_test: int = 32, seed: int = 0) -> Sequences:
    """Cut ``text`` into windows of ``seq_len + 1`` bytes (consecutive windows share one
    byte) and hold out ``n_test`` of them, chosen by a seeded permutation."""
    tokens = encode(text)
    n = (len(tokens) - 1) // seq_len
    if n < n_test + 2:
        raise ValueError(
            f"text of {len(tokens)} bytes gives {n} windows of seq_len={seq_len}; n_test="
            f"{n_test} needs at least {n_test + 2}."
        )
    starts = torch.arange(n) * seq_len
    index = starts[:, None] + torch.arange(seq_len + 1)
    windows = tokens[index]
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    test, train = order[:n_test].sort().values, order[n_test:].sort().values
    return Sequences(
        x_train=windows[train, :-1].contiguous(),
        y_train=windows[train, 1:].contiguous(),
        train_ids=train,
        x_test=windows[test, :-1].contiguous(),
        y_test=windows[test, 1:].contiguous(),
        test_ids=test,
        seq_len=seq_len,
    )


# ---------------------------------------------------------------------- model
@dataclass(frozen=True)
class GPTConfig:
    vocab: int = VOCAB
    seq_len: int = 64
    d_model: int = 256
    n_layers: int = 3
    n_heads: int = 4


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError(
                f"d_model ({config.d_model}) must be a multiple of n_heads ({config.n_heads})."
            )
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.out = nn.Linear(4 * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A causal byte-level transformer: (B, T) int64 tokens → (B, T, vocab) logits."""

    def __init__(self, config: GPTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or GPTConfig()
        self.tok = nn.Embedding(config.vocab, config.d_model)
        self.pos = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.is_floating_point():
            raise ValueError(f"x must be (B, T) integer token ids, got {x.dtype} {tuple(x.shape)}.")
        if x.shape[1] > self.config.seq_len:
            raise ValueError(
                f"sequences of {x.shape[1]} tokens exceed the model's seq_len "
                f"{self.config.seq_len}."
            )
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0


def train(
    sequences: Sequences, config: GPTConfig | None = None, budget: TrainConfig | None = None
) -> TinyGPT:
    """Train :class:`TinyGPT` with AdamW (cosine schedule, warm-up of 5 % of the steps) on
    the mean next-byte cross-entropy of seeded random training batches; returns the model
    in eval mode with no gradients kept."""
    config = config or GPTConfig(seq_len=sequences.seq_len)
    budget = budget or TrainConfig()
    torch.manual_seed(budget.seed)
    model = TinyGPT(config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=budget.lr, weight_decay=budget.weight_decay
    )
    warm = max(1, budget.steps // 20)

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, budget.steps - warm)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(budget.seed)
    n = len(sequences.x_train)
    model.train()
    for _ in range(budget.steps):
        rows = torch.randint(0, n, (min(budget.batch_size, n),), generator=generator)
        logits = model(sequences.x_train[rows])
        loss = F.cross_entropy(
            logits.reshape(-1, config.vocab), sequences.y_train[rows].reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


def mean_token_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(x)
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))


def cached_checkpoint(
    sequences: Sequences,
    corpus_digest: str,
    config: GPTConfig | None = None,
    budget: TrainConfig | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Path of the checkpoint (a state dict) trained with these settings on this corpus,
    training it on first use; written atomically."""
    config = config or GPTConfig(seq_len=sequences.seq_len)
    budget = budget or TrainConfig()
    settings = {"model": asdict(config), "train": asdict(budget), "corpus": corpus_digest, "v": 1}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"tiny-gpt-{key}.pt"
    if not path.exists():
        model = train(sequences, config, budget)
        save_state(model.state_dict(), path)
    return path


def load_model(checkpoint: str | Path, config: GPTConfig | None = None) -> TinyGPT:
    model = TinyGPT(config)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    return model


def corpus_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- attribution
@dataclass(frozen=True)
class AttributionConfig:
    fisher: str = "sampled"
    fisher_samples: int = 1
    regularization: float = 1e-3
    rank: int | None = 32
    n_shards: int = 4
    top_k: int = 5
    batch_size: int = 16
    seed: int = 0


def attribute(
    model: nn.Module,
    sequences: Sequences,
    store_root: str | os.PathLike[str],
    config: AttributionConfig | None = None,
    *,
    test_set: str = "heldout",
) -> Any:
    """Fit EK-FAC on the training sequences, store the held-out sequences' rank-r query
    factors, score every training shard through the store's writer and return the store
    (its ``top_k(test_set)`` table names the most helpful and harmful training windows)."""
    from torch.utils.data import DataLoader, TensorDataset

    from ..influence import EkfacInfluence
    from ..store import InfluenceStore, ShardSpec

    config = config or AttributionConfig()
    influence = EkfacInfluence(
        model,
        update_diagonal=True,
        hessian_regularization=config.regularization,
        fisher=config.fisher,
        fisher_samples=config.fisher_samples,
        seed=config.seed,
        batch_size=config.batch_size,
    )
    s = sequences
    influence.fit(DataLoader(TensorDataset(s.x_train, s.y_train), batch_size=config.batch_size))
    store = InfluenceStore(store_root)
    store.save_block_mapper(influence)
    test_loader = DataLoader(
        TensorDataset(s.x_test, s.y_test, s.test_ids), batch_size=config.batch_size
    )
    store.write_query_factors(test_set, influence, test_loader, rank=config.rank)
    parts = np.array_split(np.arange(len(s.x_train)), config.n_shards)
    shards = [ShardSpec(f"shard-{i}", len(rows)) for i, rows in enumerate(parts)]
    store.allocate_shards(test_set, shards)
    for spec, rows in zip(shards, parts, strict=True):
        index = torch.from_numpy(rows)
        loader = DataLoader(
            TensorDataset(s.x_train[index], s.y_train[index], s.train_ids[index]),
            batch_size=config.batch_size,
        )
        store.write_shard_scores(
            test_set, spec.name, influence, loader, top_k=config.top_k, query_rank=config.rank
        )
    return store


def window_text(text: str, window: int, seq_len: int) -> str:
    """The ``seq_len`` bytes of window ``window`` (its input x) as text."""
    data = text.encode("utf-8")
    return decode(list(data[window * seq_len : window * seq_len + seq_len]))


def describe_top_k(
    table: Any, text: str, seq_len: int, *, kind: str = "helpful", k: int = 3, width: int = 100
) -> str:
    """Readable text of a top-k table (the store's ``top_k``: test_id, kind, rank,
    train_id, score; ids are window indices): per query its text, then its top ``k``
    training windows of ``kind`` with their scores."""

    def show(value: str) -> str:
        flat = value.replace("\n", "⏎")
        return flat if len(flat) <= width else flat[: width - 1] + "…"

    lines: list[str] = []
    rows = table[(table["kind"] == kind) & (table["rank"] <= k)]
    for test_id, group in rows.groupby("test_id", sort=True):
        lines.append(f"query {int(test_id)}: {show(window_text(text, int(test_id), seq_len))!r}")
        for _, row in group.sort_values("rank").iterrows():
            lines.append(
                f"  {kind} #{int(row['rank'])} (window {int(row['train_id'])}, score "
                f"{float(row['score']):+.3g}): "
                f"{show(window_text(text, int(row['train_id']), seq_len))!r}"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------- as a workload
def write_files(
    data_dir: str | Path, sequences: Sequences, n_shards: int = 4, test_set: str = "heldout"
) -> None:
    """Write the sequences as tensor files ``train/shard-<i>.pt`` and
    ``test/<test_set>.pt`` (x, y, ids = window indices), once: nothing is written when
    ``<data_dir>/train`` exists (the files are then the user's)."""
    from ..workload import ShardData, save_tensor_file

    root = Path(data_dir)
    if (root / "train").exists():
        return
    s = sequences
    with staged_files(root) as staging:
        for i, rows in enumerate(np.array_split(np.arange(len(s.x_train)), n_shards)):
            index = torch.from_numpy(rows)
            save_tensor_file(
                staging / "train" / f"shard-{i}.pt",
                ShardData(s.x_train[index], s.y_train[index], s.train_ids[index]),
            )
        save_tensor_file(
            staging / "test" / f"{test_set}.pt", ShardData(s.x_test, s.y_test, s.test_ids)
        )


def tiny_gpt_workload(
    data_dir: str | Path | None = None,
    *,
    n_shards: int = 4,
    n_test: int = 16,
    store: str = "influence_store",
    config: GPTConfig | None = None,
    budget: TrainConfig | None = None,
    max_bytes: int | None = None,
    cache_dir: str | Path | None = None,
    method: Any = None,
    query_rank: int | None = 32,
) -> Any:
    """The GPT example as a :class:`~influence_pipeline.workload.Workload`: EK-FAC with the
    sampled Fisher and rank-``query_rank`` query factors in the store
    (``MethodSpec(method="ekfac", fisher="sampled", query_rank=32)``),
    the loss the engine takes for (B, T, V) outputs (cross-entropy summed over positions),
    shard files written and the model trained on first use (nothing at build time)."""
    import functools

    from ..examples.digits import ExampleShards
    from ..workload import MethodSpec, Workload, load_tensor_file

    config = config or GPTConfig()
    directory = (
        Path(data_dir)
        if data_dir is not None
        else default_cache_dir() / f"tiny-gpt-data-{n_shards}-{n_test}-{max_bytes}"
    )

    @functools.cache
    def corpus() -> str:
        return load_corpus(max_bytes=max_bytes)

    @functools.cache
    def prepared() -> tuple[Sequences, str]:
        text = corpus()
        sequences = build_sequences(text, seq_len=config.seq_len, n_test=n_test)
        write_files(directory, sequences, n_shards)
        return sequences, corpus_digest(text)

    def checkpoint() -> Path:
        sequences, digest = prepared()
        return cached_checkpoint(sequences, digest, config, budget, cache_dir)

    def heldout() -> Any:
        prepared()
        return load_tensor_file(directory / "test" / "heldout.pt")

    return Workload(
        name="tiny-gpt",
        model_factory=lambda: TinyGPT(config),
        checkpoint=checkpoint,
        loss=F.cross_entropy,
        shards=ExampleShards(directory / "train", prepared),
        test_sets={"heldout": heldout},
        method=method
        or MethodSpec(
            method="ekfac",
            regularization=1e-3,
            fisher="sampled",
            query_rank=query_rank,
            options={"seed": 0, "batch_size": 16},
        ),
        fit_shards=[f"shard-{i}" for i in range(n_shards)],
        batch_size=16,
        describe=lambda table: describe_top_k(table, corpus(), config.seq_len),
        store=store,
        description=(
            "A byte-level GPT (2.5M parameters) trained on the standard library's docstrings; "
            "held-out 64-byte windows attributed to training windows with EK-FAC."
        ),
    )


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - a demo
    """Train (cached) and attribute with the defaults; print the most helpful windows."""
    import argparse
    import tempfile
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="store path (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--fisher", default="sampled", choices=["sampled", "empirical"])
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args(argv)
    text = load_corpus()
    sequences = build_sequences(text, n_test=args.queries)
    started = time.perf_counter()
    budget = TrainConfig(steps=args.steps)
    model = load_model(cached_checkpoint(sequences, corpus_digest(text), budget=budget))
    print(
        f"corpus {len(text):,} bytes, {len(sequences.x_train):,} training windows, model "
        f"{n_parameters(model):,} parameters, held-out loss "
        f"{mean_token_loss(model, sequences.x_test, sequences.y_test):.3f} "
        f"({time.perf_counter() - started:.1f} s)"
    )
    started = time.perf_counter()
    root = args.store or tempfile.mkdtemp(prefix="tiny-gpt-store-")
    config = AttributionConfig(fisher=args.fisher, rank=args.rank)
    store = attribute(model, sequences, root, config)
    print(f"attribution in {time.perf_counter() - started:.1f} s (store {root})")
    print(describe_top_k(store.top_k("heldout", k=3), text, sequences.seq_len))


if __name__ == "__main__":  # pragma: no cover
    main()
