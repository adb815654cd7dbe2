"""Parameter blocks of a block-diagonal curvature.

* ``BlockMode.FULL``: one block named ``""`` (pyDVL's name) with every trainable parameter.
* ``BlockMode.PARAMETER_WISE``: one block per trainable parameter, named after it.
* ``BlockMode.LAYER_WISE``: one block per direct child module with trainable parameters,
  named after the child; trainable parameters registered on the root module itself get a
  block of their own each (named after the parameter) instead of being dropped.
* a mapping block name → parameter names.

Frozen parameters are excluded (with a warning when a custom block names one). Within a
block, parameters follow ``named_parameters()`` order; blocks must not overlap.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

from .types import BlockMode

BlockStructure = BlockMode | Mapping[str, Sequence[str]]


def build_parameter_blocks(
    model: torch.nn.Module, block_structure: BlockStructure
) -> OrderedDict[str, list[str]]:
    """Block name → parameter names, validated against ``model``."""
    all_names = [name for name, _ in model.named_parameters()]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameters (all have requires_grad=False).")

    blocks: OrderedDict[str, list[str]] = OrderedDict()
    if isinstance(block_structure, BlockMode):
        if block_structure is BlockMode.FULL:
            blocks[""] = trainable
        elif block_structure is BlockMode.PARAMETER_WISE:
            for name in trainable:
                blocks[name] = [name]
        elif block_structure is BlockMode.LAYER_WISE:
            trainable_set = set(trainable)
            for child_name, child in model.named_children():
                names = [
                    f"{child_name}.{n}"
                    for n, p in child.named_parameters()
                    if p.requires_grad and f"{child_name}.{n}" in trainable_set
                ]
                if names:
                    blocks[child_name] = names
            covered = {n for names in blocks.values() for n in names}
            for name in trainable:
                if name not in covered:
                    blocks[name] = [name]
        else:  # pragma: no cover - exhaustive enum
            raise ValueError(f"Unknown block mode {block_structure!r}.")
        return blocks

    if not isinstance(block_structure, Mapping):
        raise TypeError(
            "block_structure must be a BlockMode or a mapping of block name to parameter "
            f"names, got {type(block_structure).__name__}."
        )
    order = {name: i for i, name in enumerate(all_names)}
    seen: dict[str, str] = {}
    for block_name, listed in block_structure.items():
        if isinstance(listed, str):
            raise TypeError(
                f"Block {block_name!r} must list parameter names, got the string {listed!r}."
            )
        unknown = [n for n in listed if n not in order]
        if unknown:
            raise ValueError(
                f"Block {block_name!r} names unknown parameters {unknown}; the model has "
                f"parameters {all_names}."
            )
        kept = []
        for name in sorted(set(listed), key=order.__getitem__):
            if name in seen:
                raise ValueError(
                    f"Parameter {name!r} is in blocks {seen[name]!r} and {block_name!r}; "
                    "blocks of a block-diagonal curvature must not overlap."
                )
            seen[name] = block_name
            if name in trainable:
                kept.append(name)
            else:
                warnings.warn(
                    f"Parameter {name!r} of block {block_name!r} is frozen "
                    "(requires_grad=False) and is left out.",
                    stacklevel=3,
                )
        if not kept:
            raise ValueError(f"Block {block_name!r} has no trainable parameters.")
        blocks[str(block_name)] = kept
    if not blocks:
        raise ValueError("The block structure defines no blocks.")
    return blocks
