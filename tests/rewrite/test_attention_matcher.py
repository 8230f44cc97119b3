"""The shared attention matcher: the bmm form with heads folded into the batch, nn.MultiheadAttention calls, and
a reason naming the node for every candidate that does not match."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from effcompile.patterns import find_attention, match_attention


class _BmmAttention(torch.nn.Module):
    """DeBERTa-style: q, k, v as [B·H, S, D]; scores + bias, viewed to [B, H, S, S], masked, softmax, viewed back."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        scores = torch.bmm(q, k.transpose(-1, -2) / 2.0) + bias
        scores = scores.view(-1, 3, scores.size(-2), scores.size(-1)).masked_fill(~mask, -1e9)
        probs = F.dropout(torch.softmax(scores, dim=-1), 0.0)
        return torch.bmm(probs.view(-1, probs.size(-2), probs.size(-1)), v)


class _Classifier(torch.nn.Module):
    """A softmax that is not attention, and an attention whose probabilities are returned too."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(x @ x.transpose(-1, -2), dim=-1)
        return torch.softmax(self.linear(x), dim=-1), probs @ x + probs.sum()


class _Mha(torch.nn.Module):
    def __init__(self, use_weights: bool) -> None:
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.use_weights = use_weights

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        if self.use_weights:
            out, weights = self.attention(x, x, x)
            return out + weights.mean()
        return self.attention(x, x, x, key_padding_mask=padding)[0]


def test_bmm_form_is_matched_with_its_head_count():
    gm = torch.fx.symbolic_trace(_BmmAttention())
    (site,) = find_attention(gm)
    assert site.kind == "explicit" and site.heads_in_batch == 3
    assert site.query.name == "q" and site.value.name == "v" and site.node.target is torch.bmm


def test_candidates_that_do_not_match_say_why():
    gm = torch.fx.symbolic_trace(_Classifier())
    sites, misses = match_attention(gm)
    assert sites == [] and len(misses) == 2
    reasons = {m.node.name: m.reason for m in misses}
    assert "is not a score matmul" in reasons["softmax_1"] and "linear" in reasons["softmax_1"]
    assert "have 2 users, not one value matmul" in reasons["softmax"]


def test_multihead_attention_calls():
    matched = torch.fx.symbolic_trace(_Mha(use_weights=False))
    sites, misses = match_attention(matched)
    assert sites == [] and "passes key_padding_mask" in misses[0].reason and "attention" in misses[0].reason
    weights = torch.fx.symbolic_trace(_Mha(use_weights=True))
    sites, misses = match_attention(weights)
    assert sites == [] and "attention weights (output 1) are used" in misses[0].reason
    plain = torch.nn.Module()
    plain.attention = torch.nn.MultiheadAttention(8, 2)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    call = graph.call_module("attention", (x, x, x), {"need_weights": False})
    graph.output(graph.call_function(__import__("operator").getitem, (call, 0)))
    sites, misses = match_attention(torch.fx.GraphModule(plain, graph))
    assert misses == [] and sites[0].kind == "module" and sites[0].module_target == "attention"


class _SoftCapped(torch.nn.Module):
    """Gemma-2-style logit soft-capping between the score matmul and the softmax."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = torch.tanh((q @ k.transpose(-1, -2)) / 30.0) * 30.0
        return torch.softmax(scores, dim=-1) @ v


def test_soft_capped_scores_stay_unmatched_naming_the_cap():
    """A soft-cap (div → tanh → mul) is not an op the sparse kernels apply: the matcher must not match through
    it (which would drop the cap) and its reason names the tanh node where the chain stops."""
    gm = torch.fx.symbolic_trace(_SoftCapped())
    sites, misses = match_attention(gm)
    assert sites == [] and len(misses) == 1
    assert "tanh" in misses[0].reason and "is not a score matmul" in misses[0].reason
