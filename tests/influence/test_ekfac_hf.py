"""EK-FAC on a tiny Hugging Face GPT-2 (``transformers``, the ``hf`` extra): its ``Conv1D``
layers (weight stored (in, out)) are factored, the tied ``lm_head``, embeddings and
LayerNorms are left out, and the per-layer scores equal the brute force."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import EkfacInfluence

from .ekfac_brute import dense_inverse, dense_scores, per_example_matrices, rel, sequence_loss


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).to(torch.float64).eval()


def test_gpt2_conv1d_layers_score_like_brute_force():
    model = tiny_gpt2()
    tokens = torch.randint(0, 11, (10, 6), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :5], tokens[:, 1:]
    lam = 0.05
    influence = EkfacInfluence(
        model, update_diagonal=True, hessian_regularization=lam, fisher="sampled", seed=0
    ).fit(DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4))
    assert influence.modules == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
    assert "transformer.wte.weight" in influence.excluded_parameters  # tied with lm_head
    assert "transformer.h.0.ln_1.weight" in influence.excluded_parameters
    inverses = {
        name: dense_inverse(c.op.factors.evecs_g, c.op.factors.evecs_a, c.op.factors.diag, lam)
        for name, c in influence.block_mapper.items()
    }
    names = influence.modules
    expected = dense_scores(
        per_example_matrices(model, sequence_loss, x[8:], y[8:], names),
        per_example_matrices(model, sequence_loss, x[:8], y[:8], names),
        inverses,
    )
    assert rel(influence.influences(x[8:], y[8:], x[:8], y[:8]), expected) < 1e-6
    low = influence.compressed_factors(x[8:], y[8:], rank=2)
    assert low.nbytes < influence.compressed_factors(x[8:], y[8:]).nbytes
    assert influence.influences_from_factors(low, x[:8], y[:8]).shape == (2, 8)
