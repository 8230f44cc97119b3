"""The shared matcher: find linear-like ops and attention in a captured graph, whichever capture path
made it. Passes ask here; none walks the graph for these patterns itself.

Linear-like (``LinearSite``):
  1. ``call_module`` of ``nn.Linear`` (weight ``[out, in]``) or Hugging Face ``Conv1D`` (``[in, out]``);
  2. ``F.linear`` / ``aten.linear`` with a parameter weight (``[out, in]``);
  3. ``torch.addmm`` / ``aten.addmm`` (bias, x, W) with a parameter W (``[in, out]``, HF Conv1D exported);
  4. ``torch.mm`` / ``aten.mm`` / ``matmul`` of an activation by a 2-D parameter (``[in, out]``).
Attention (``AttentionSite``):
  1. ``scaled_dot_product_attention`` (functional or ``aten``);
  2. explicit ``matmul(q, kᵀ) → [scale] → [+ mask] → softmax → [dropout] → matmul(·, v)``, also with the
     heads folded into the batch (``bmm → [+ bias] → view → … → softmax → … → view → bmm``, DeBERTa);
  3. ``nn.MultiheadAttention`` called as a module (a leaf under symbolic_trace, torchvision's ViT).
``match_attention`` also says, for each candidate that did not match, why (naming the node).
Loss heads (``HeadSite``, ``match_loss_head``; shared by ``remat``'s chunked head and ``fuse``'s fused
linear + cross-entropy): ``linear → [views, one float cast, leading slices] → cross_entropy``.
Matchers that can fail say why (``NoMatch``: the node where the pattern broke and the reason).
One module each: ``ops`` (the op sets, ``NoMatch``), ``linears``, ``attention``, ``loss_heads``.
"""

from .attention import (
                        ASSERTION_OPS,
                        TRANSPOSE_OPS,
                        VIEW_OPS,
                        AttentionSite,
                        find_attention,
                        is_softmax,
                        match_attention,
)
from .linears import LinearSite, find_linears
from .loss_heads import (
                        HEAD_VIEW_METHODS,
                        HEAD_VIEWS,
                        HeadSite,
                        cross_entropy_options,
                        find_loss_heads,
                        float_cast,
                        match_loss_head,
                        node_rank,
)
from .ops import (
                        ADDMM_FUNCTIONS,
                        DTYPE_CONVERSIONS,
                        LINEAR_FUNCTIONS,
                        MATMUL_FUNCTIONS,
                        MM_FUNCTIONS,
                        SDPA_FUNCTIONS,
                        SOFTMAX_FUNCTIONS,
                        NoMatch,
)

__all__ = ["ADDMM_FUNCTIONS", "ASSERTION_OPS", "TRANSPOSE_OPS", "VIEW_OPS", "DTYPE_CONVERSIONS", "HEAD_VIEWS", "HEAD_VIEW_METHODS", "LINEAR_FUNCTIONS",
           "MATMUL_FUNCTIONS", "MM_FUNCTIONS", "SDPA_FUNCTIONS", "SOFTMAX_FUNCTIONS", "AttentionSite", "HeadSite",
           "LinearSite", "NoMatch", "cross_entropy_options", "find_attention", "find_linears", "find_loss_heads",
           "float_cast", "is_softmax", "match_attention", "match_loss_head", "node_rank"]
