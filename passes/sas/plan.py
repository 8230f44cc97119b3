"""``SasPlan``: what the ``sas`` pass leaves on the Program for later readers (reports, tools, tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SasSite:
    """One attention made sparse: where, its shape, its mask and what it costs.

    Densities are measured at the compiled lengths: ``token_density`` is attended pairs over the pairs
    dense attention attends (causal: k ≤ q); ``tile_density`` is computed tiles over dense's tiles."""

    target: str  # the SparseAttention module's path
    path: str  # the attention's module path
    kind: str  # "sdpa" | "explicit" | "module"
    heads: int
    kv_heads: int
    query_len: int
    key_len: int
    causal: bool
    patterns: tuple[str, ...]  # one shared pattern, or one per head
    mask: str  # how the attention's own mask is handled
    token_density: float
    tile_density: float
    kept_tiles: int
    partial_tiles: int
    backend: str = ""  # the kernel the measuring run used
    mask_build_ms: float | None = None  # building this mask's kernel data (None: shared with ``mask_shared_with``)
    mask_shared_with: str | None = None
    attention_ms: float | None = None  # one forward of this attention (second run, mask built)
    views_reshaped: int = 0


@dataclass
class SasPlan:
    """Every rewritten attention (``sites``), every matched one left dense with the reason (``skipped``), and
    every candidate the matcher rejected with the reason (``unmatched``)."""

    sites: list[SasSite] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    unmatched: list[dict[str, str]] = field(default_factory=list)
    pattern: str = ""
    block_size: int = 0

    def block_masks(self, gm: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Each site's tile mask (``[H or 1, nQ, nK]`` bool, a CPU copy), read from its module."""
        return {site.target: gm.get_buffer(f"{site.target}.tile_mask").detach().cpu().clone() for site in self.sites}
