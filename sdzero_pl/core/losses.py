"""Distillation losses for Phase 2 (docs/method.md, "Phase 2", step 4): pure functions, tensors in, tensors out.

The teacher's top-k ids (k = 64) are found in a no-grad pass; both distributions are renormalised over those k
ids and compared per token:

* ``reverse``: KL(student || teacher), the paper's Eq. 4;
* ``forward``: KL(teacher || student);
* ``mixed``:  w * forward + (1 - w) * reverse, the reference code's default with w = 0.5.

Never materialise [batch, seq, vocab] logits: the teacher's top-k is computed over chunks of tokens, and the
student's logits are computed ONLY at the k ids (``h . W[id]``), by an autograd function that recomputes the
gathered weight rows chunk by chunk in backward instead of saving them. The renormalisation over the k ids
cancels the student's full-vocab normaliser, so nothing else is needed.

That renormalisation also hides how much of its probability the student keeps on the teacher's top-k: a student
can move mass outside it at zero loss (verl dropped top-k reverse KL for this collapse, its issue #5041). The drift
monitor measures that mass (:func:`full_logsumexp` gives the student's full-vocab normaliser, chunked), and the
optional tail term compares k + 1 buckets, the k full-vocab probabilities plus one "rest" bucket (``1 - mass``),
for both distributions (``student_log_mass`` / ``teacher_log_mass`` of :func:`topk_divergence`; TRL's SDFT calls it
``distillation_add_tail``). Off by default, as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("reverse", "forward", "mixed")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half precision is upcast to float32 for the softmax maths; float64 stays float64 (exactness tests)."""
    return t if t.dtype == torch.float64 else t.float()


def reverse_kl(student_logps: torch.Tensor, teacher_logps: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) per row: sum_k p_s (log p_s - log p_t). (N, k), (N, k) -> (N,)"""
    return (student_logps.exp() * (student_logps - teacher_logps)).sum(-1)


def forward_kl(student_logps: torch.Tensor, teacher_logps: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row: sum_k p_t (log p_t - log p_s). (N, k), (N, k) -> (N,)"""
    return (teacher_logps.exp() * (teacher_logps - student_logps)).sum(-1)


def check_divergence(divergence: str, forward_weight: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {DIVERGENCES}, got {divergence!r}")
    if not 0.0 <= forward_weight <= 1.0:
        raise ValueError(f"`forward_weight` must be in [0, 1], got {forward_weight}")


def with_rest_bucket(renormalised_logps: torch.Tensor, log_mass: torch.Tensor) -> torch.Tensor:
    """k + 1 buckets from a distribution renormalised over k ids and the log of the full-vocab mass on them: the k
    full-vocab log-probs ``logp + log_mass`` and the rest ``log(1 - mass)``. (N, k), (N,) -> (N, k + 1)"""
    log_mass = log_mass.clamp(max=-torch.finfo(log_mass.dtype).tiny)  # mass 1: a rest of ~0, not log(0)
    return torch.cat([renormalised_logps + log_mass[:, None], torch.log(-torch.expm1(log_mass))[:, None]], dim=-1)


def topk_divergence(
    student_topk_logits: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    divergence: str = "mixed",
    forward_weight: float = 0.5,
    student_log_mass: torch.Tensor | None = None,
    teacher_log_mass: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token divergence over the teacher's top-k ids, both renormalised over those ids; with both log masses
    given (the tail term), over k + 1 buckets instead: the k full-vocab probabilities and the rest.

    student_topk_logits (N, k) and student_log_mass (N,) carry the gradient; teacher_topk_logits (N, k) and
    teacher_log_mass (N,) are detached here (stop-grad).
    Returns ``{"loss": (N,), "kl_forward": (N,), "kl_reverse": (N,)}``; only "loss" depends on ``divergence``.
    """
    check_divergence(divergence, forward_weight)
    if (student_log_mass is None) != (teacher_log_mass is None):
        raise ValueError("the tail term needs both the student's and the teacher's log mass on the top-k")
    student_logps = F.log_softmax(_upcast(student_topk_logits), dim=-1)  # (N, k)
    teacher_logps = F.log_softmax(_upcast(teacher_topk_logits.detach()), dim=-1)  # (N, k)
    if student_log_mass is not None:
        student_logps = with_rest_bucket(student_logps, _upcast(student_log_mass))  # (N, k + 1)
        teacher_logps = with_rest_bucket(teacher_logps, _upcast(teacher_log_mass.detach()))  # (N, k + 1)
    kl_forward = forward_kl(student_logps, teacher_logps)  # (N,)
    kl_reverse = reverse_kl(student_logps, teacher_logps)  # (N,)
    if divergence == "reverse":
        loss = kl_reverse
    elif divergence == "forward":
        loss = kl_forward
    else:
        loss = forward_weight * kl_forward + (1.0 - forward_weight) * kl_reverse
    return {"loss": loss, "kl_forward": kl_forward, "kl_reverse": kl_reverse}


@torch.no_grad()
def teacher_topk(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, chunk_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids and logits of ``hidden @ weight.T``, chunked over tokens; also the top-k probability mass.

    hidden (N, H), weight (V, H) -> ids (N, k), logits (N, k), mass (N,) = sum of the k full-vocab probs; logits and
    mass in float32 (float64 for float64 inputs). The ids come from the full product in the weights' dtype; the k
    logits are then recomputed exactly as the student's are (:func:`gathered_logits`: float32 products of the
    gathered rows), so the same model on the same context gives the same logits in both roles, also in bf16.
    """
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"`top_k` must be in [1, vocab size {weight.shape[0]}], got {k}")
    n = hidden.shape[0]
    ids = torch.empty(n, k, dtype=torch.long, device=hidden.device)
    dtype = _upcast(hidden[:0]).dtype
    logits = torch.empty(n, k, dtype=dtype, device=hidden.device)
    mass = torch.empty(n, dtype=dtype, device=hidden.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        full = _upcast(F.linear(hidden[start:stop], weight))  # (n, V), one chunk only
        values, indices = full.topk(k, dim=-1)  # (n, k)
        ids[start:stop] = indices
        mass[start:stop] = (values.logsumexp(-1) - full.logsumexp(-1)).exp()
        del full
        _rows_logits(hidden[start:stop], weight, indices, _row_chunk(chunk_size, indices, hidden), logits[start:stop])
    return ids, logits, mass


# Elements of the (n, k, H) gathered-rows buffer: the token chunk of the gathered head is capped so that buffer
# stays near 64 MB in float32 whatever k and H are (perf/bench_distill_loss.py measured it).
_ROWS_BUDGET = 1 << 24


def _row_chunk(chunk_size: int, ids: torch.Tensor, hidden: torch.Tensor) -> int:
    return max(1, min(chunk_size, _ROWS_BUDGET // max(1, ids.shape[-1] * hidden.shape[-1])))


def _rows_logits(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, step: int, out: torch.Tensor) -> None:
    """out[n, j] = hidden[n] . weight[ids[n, j]] in float32 (float64 stays), ``step`` tokens at a time: the one
    computation of top-k logits, shared by the teacher (no grad) and the student (:class:`_GatheredLogits`)."""
    for start in range(0, hidden.shape[0], step):
        stop = min(start + step, hidden.shape[0])
        rows = _upcast(F.embedding(ids[start:stop], weight))  # (n, k, H)
        out[start:stop] = torch.einsum("nh,nkh->nk", _upcast(hidden[start:stop]), rows)
        del rows  # free before the next chunk's gather


class _GatheredLogits(torch.autograd.Function):
    """logits[n, j] = hidden[n] . weight[ids[n, j]], saving only (hidden, weight, ids) for backward."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, chunk_size):  # (N, H), (V, H), (N, k) -> (N, k)
        out = torch.empty(ids.shape, dtype=_upcast(hidden[:0]).dtype, device=hidden.device)
        step = _row_chunk(chunk_size, ids, hidden)
        _rows_logits(hidden, weight, ids, step, out)
        ctx.save_for_backward(hidden, weight, ids)
        ctx.step = step
        return out

    @staticmethod
    def backward(ctx, grad_out):  # (N, k)
        hidden, weight, ids = ctx.saved_tensors
        grad_hidden = _upcast(torch.zeros_like(hidden)) if ctx.needs_input_grad[0] else None
        exact = weight.dtype == _upcast(weight[:0]).dtype  # float32 / float64: accumulate in the gradient itself
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.step):
            stop = min(start + ctx.step, hidden.shape[0])
            g = _upcast(grad_out[start:stop])  # (n, k)
            h = _upcast(hidden[start:stop])  # (n, H)
            if grad_hidden is not None:
                rows = _upcast(F.embedding(ids[start:stop], weight))  # (n, k, H)
                grad_hidden[start:stop] = torch.einsum("nk,nkh->nh", g, rows)
            else:
                rows = torch.empty(*g.shape, h.shape[-1], dtype=h.dtype, device=h.device)
            if grad_weight is not None and exact:
                torch.mul(g.unsqueeze(-1), h.unsqueeze(1), out=rows)  # (n, k, H), reusing the rows buffer
                grad_weight.index_add_(0, ids[start:stop].reshape(-1), rows.reshape(-1, h.shape[-1]))
            del rows
        if grad_weight is not None and not exact:
            _weight_grad_by_vocab_block(_upcast(grad_out), hidden, ids, grad_weight)
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            grad_weight,
            None,
            None,
        )


def _weight_grad_by_vocab_block(grad_out: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor,
                                grad_weight: torch.Tensor) -> None:
    """grad_weight[v] = sum over (n, j) with ids[n, j] == v of grad_out[n, j] * hidden[n], accumulated in float32 one
    block of vocabulary rows at a time and written in the weights' dtype (bf16 / fp16): a float32 buffer of the
    whole head (V x H x 4 bytes) would be the largest allocation of the loss. (N, k), (N, H), (N, k) -> (V, H)"""
    width = hidden.shape[-1]
    flat = ids.reshape(-1)
    order = flat.argsort()  # the (n, j) pairs grouped by vocabulary row
    sorted_ids, tokens, grads = flat[order], order // ids.shape[-1], grad_out.reshape(-1)[order]
    block = max(1, _ROWS_BUDGET // width)  # vocabulary rows per float32 buffer, and pairs per contribution chunk
    for v0 in range(0, grad_weight.shape[0], block):
        lo, hi = torch.searchsorted(sorted_ids, torch.tensor([v0, v0 + block], device=ids.device)).tolist()
        if lo == hi:
            continue
        rows = min(block, grad_weight.shape[0] - v0)
        acc = torch.zeros(rows, width, dtype=torch.float32, device=hidden.device)
        for p0 in range(lo, hi, block):
            p1 = min(p0 + block, hi)
            contrib = grads[p0:p1, None] * hidden[tokens[p0:p1]].float()  # (P, H)
            acc.index_add_(0, sorted_ids[p0:p1] - v0, contrib)
        grad_weight[v0:v0 + rows] = acc.to(grad_weight.dtype)


def gathered_logits(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, chunk_size: int = 512) -> torch.Tensor:
    """Student logits at the given ids only, with gradient: (N, H), (V, H), (N, k) -> (N, k), float32 or float64."""
    return _GatheredLogits.apply(hidden, weight, ids, chunk_size)


def _chunk_logsumexp(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _upcast(F.linear(hidden, weight)).logsumexp(-1)  # (n, V) for one chunk only -> (n,)


def full_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int = 512) -> torch.Tensor:
    """The full-vocabulary normaliser ``logsumexp(hidden @ weight.T)`` of each token, ``chunk_size`` rows at a time;
    with gradient, each chunk's logits are recomputed in backward (activation checkpointing). (N, H), (V, H) -> (N,),
    float32 (float64 for float64 inputs). The student's log mass on the teacher's top-k is
    ``logsumexp(student_topk_logits) - full_logsumexp(student_h, W)``."""
    track = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start:start + chunk_size], weight)
        parts.append(checkpoint(_chunk_logsumexp, *args, use_reentrant=False) if track else _chunk_logsumexp(*args))
    return torch.cat(parts) if parts else _upcast(hidden.new_zeros(0))


def normalised_sum(per_token: torch.Tensor, global_tokens: int, accumulate: int = 1, world_size: int = 1) -> torch.Tensor:
    """Sum of a micro-batch's per-token losses, scaled so the optimizer step sees the token mean of the GLOBAL batch.

    Lightning divides each micro-batch loss by ``accumulate`` and data-parallel all-reduce averages over
    ``world_size`` ranks; multiplying back by both and dividing by the number of valid tokens in the whole
    optimizer step (all micro-batches, all ranks) makes the gradient independent of how the batch is split.
    """
    if global_tokens <= 0:
        return per_token.sum() * 0.0  # nothing valid in the whole step: keep the graph, contribute nothing
    return per_token.sum() * (accumulate * world_size / global_tokens)


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)  # (n, V), one chunk only
    return -F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
                ) -> torch.Tensor:
    """Full-vocabulary ``log p(target)`` of each token, ``chunk_size`` rows at a time: never an [N, V] tensor for
    all rows. With gradient, each chunk's logits are recomputed in backward (activation checkpointing) instead of
    being kept. hidden (N, H), weight (V, H), targets (N,) -> (N,), float32 (float64 for float64 inputs).

    The one log-prob of the project: SFT and GRPO losses (``-token_logps``), the rollout staleness metric and the
    self-localization token KL reward."""
    parts = []
    track = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start : start + chunk_size], weight, targets[start : start + chunk_size])
        parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if track else _chunk_logps(*args))
    if parts:
        return torch.cat(parts)
    return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))


def naive_topk_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    divergence: str = "mixed",
    forward_weight: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Reference: full [N, V] logits for both models, then the same top-k divergence. For tests and benchmarks."""
    ids = teacher_logits.detach().topk(k, dim=-1).indices  # (N, k)
    return topk_divergence(student_logits.gather(-1, ids), teacher_logits.gather(-1, ids), divergence, forward_weight)
