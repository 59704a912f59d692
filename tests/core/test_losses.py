"""Distillation losses: hand-computed cases, naive full-vocab references, stop-grad, chunking, normalisation."""

import math

import pytest
import torch
import torch.nn.functional as F

from sdzero_pl.core.losses import (
    forward_kl, full_logsumexp, gathered_logits, naive_topk_divergence, normalised_sum, reverse_kl, teacher_topk,
    token_logps, topk_divergence, with_rest_bucket
)


def test_kl_directions_match_hand_computed_two_token_case():
    p_student = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    p_teacher = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(student || teacher)
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(teacher || student)
    assert reverse_kl(p_student.log(), p_teacher.log()).item() == pytest.approx(reverse, abs=1e-12)
    assert forward_kl(p_student.log(), p_teacher.log()).item() == pytest.approx(forward, abs=1e-12)
    terms = topk_divergence(p_student.log(), p_teacher.log(), "mixed", forward_weight=0.25)
    assert terms["loss"].item() == pytest.approx(0.25 * forward + 0.75 * reverse, abs=1e-12)
    assert reverse != pytest.approx(forward)  # the case tells the two directions apart


@pytest.mark.parametrize("divergence", ["reverse", "forward", "mixed"])
def test_divergence_with_k_equal_vocab_matches_full_vocab_kl(divergence):
    torch.manual_seed(0)
    student, teacher = torch.randn(7, 11, dtype=torch.float64), torch.randn(7, 11, dtype=torch.float64)
    ls, lt = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    full_forward = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)  # KL(teacher || student)
    full_reverse = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)  # KL(student || teacher)
    expected = {"forward": full_forward, "reverse": full_reverse, "mixed": 0.5 * full_forward + 0.5 * full_reverse}
    got = naive_topk_divergence(student, teacher, k=11, divergence=divergence)["loss"]
    torch.testing.assert_close(got, expected[divergence])


@pytest.mark.parametrize("divergence", ["reverse", "forward", "mixed"])
def test_identical_distributions_give_zero(divergence):
    logits = torch.randn(5, 9, dtype=torch.float64)
    loss = topk_divergence(logits, logits.clone(), divergence)["loss"]
    torch.testing.assert_close(loss, torch.zeros(5, dtype=torch.float64))


def test_no_gradient_reaches_the_teacher():
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    topk_divergence(student, teacher, "mixed")["loss"].sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_topk_renormalisation_ignores_ids_outside_the_topk():
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 20, dtype=torch.float64), torch.randn(3, 20, dtype=torch.float64)
    ids = teacher.topk(4, -1).indices
    moved = student.clone()
    outside = torch.ones_like(student, dtype=torch.bool).scatter_(1, ids, False)
    moved[outside] += 5.0  # student mass outside the teacher's top-k does not enter the renormalised loss
    a = naive_topk_divergence(student, teacher, k=4)["loss"]
    b = naive_topk_divergence(moved, teacher, k=4)["loss"]
    torch.testing.assert_close(a, b)


def test_teacher_topk_chunks_match_full_topk_and_mass():
    torch.manual_seed(2)
    hidden, weight = torch.randn(13, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    ids, logits, mass = teacher_topk(hidden, weight, k=5, chunk_size=4)
    full = hidden @ weight.T
    ref = full.topk(5, -1)
    assert torch.equal(ids, ref.indices)
    torch.testing.assert_close(logits, ref.values)
    torch.testing.assert_close(mass, full.softmax(-1).gather(-1, ids).sum(-1))


def test_teacher_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="top_k"):
        teacher_topk(torch.randn(2, 4), torch.randn(10, 4), k=0)


def test_gathered_logits_match_full_logits_with_gradients():
    torch.manual_seed(3)
    hidden = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(25, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 25, (9, 4))
    torch.autograd.gradcheck(lambda h, w: gathered_logits(h, w, ids, 4).double(), (hidden, weight))
    got = gathered_logits(hidden, weight, ids, chunk_size=2)
    torch.testing.assert_close(got.double(), (hidden @ weight.T).gather(-1, ids), rtol=1e-6, atol=1e-6)


def test_chunked_loss_equals_naive_loss_and_gradients():
    torch.manual_seed(4)
    n, h, v, k = 20, 8, 50, 6
    hs = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(n, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64)
    ids, t_logits, _ = teacher_topk(ht, wt, k, chunk_size=7)
    chunked = topk_divergence(gathered_logits(hs, ws, ids, 7), t_logits, "mixed")["loss"].sum()
    chunked.backward()
    grads = hs.grad.clone(), ws.grad.clone()
    hs.grad, ws.grad = None, None
    naive = naive_topk_divergence(hs @ ws.T, ht @ wt.T, k, "mixed")["loss"].sum()
    naive.backward()
    torch.testing.assert_close(chunked.double(), naive.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], hs.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], ws.grad, rtol=1e-5, atol=1e-6)


def test_normalised_sum_is_the_global_token_mean_however_the_batch_is_split():
    torch.manual_seed(5)
    per_token = [torch.rand(n, dtype=torch.float64) for n in (3, 5, 2, 6)]  # 4 micro-batches, 16 tokens
    total = sum(t.sum() for t in per_token) / 16
    # micro-batch 1 x accumulate 4: Lightning divides each loss by accumulate and sums the gradients
    accumulated = sum(normalised_sum(t, 16, accumulate=4) / 4 for t in per_token)
    # micro-batch 4 x accumulate 1
    single = normalised_sum(torch.cat(per_token), 16, accumulate=1)
    # 2 ranks x accumulate 2: DDP averages over ranks
    ranks = [sum(normalised_sum(t, 16, 2, 2) / 2 for t in pair) for pair in (per_token[:2], per_token[2:])]
    torch.testing.assert_close(accumulated, total)
    torch.testing.assert_close(single, total)
    torch.testing.assert_close(sum(ranks) / 2, total)


def test_step_without_valid_tokens_contributes_zero_but_keeps_the_graph():
    x = torch.ones(0, requires_grad=True)
    loss = normalised_sum(x * 2, 0)
    loss.backward()
    assert loss.item() == 0.0


def test_unknown_divergence_names_the_value():
    with pytest.raises(ValueError, match="'kl'"):
        topk_divergence(torch.randn(1, 2), torch.randn(1, 2), "kl")


# ------------------------------------------------------------------------------------ token log-probs
def test_token_logps_match_full_cross_entropy_values_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (13,))
    fast = -token_logps(hidden, weight, targets, chunk_size=4)
    naive = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    torch.testing.assert_close(fast, naive)
    grads = torch.autograd.grad(fast.sum(), (hidden, weight))
    expected = torch.autograd.grad(naive.sum(), (hidden, weight))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_token_logps_match_full_log_softmax_for_any_chunk_size():
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(7, 5, generator=gen), torch.randn(11, 5, generator=gen)
    targets = torch.randint(0, 11, (7,), generator=gen)
    reference = F.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    for chunk in (1, 3, 100):
        assert torch.allclose(token_logps(hidden, weight, targets, chunk), reference, atol=1e-6)


# ------------------------------------------------------------------------------------ bf16 symmetry, drift, tail
@pytest.mark.parametrize("chunk_size", [3, 512])
def test_identical_student_and_teacher_in_bf16_give_exactly_zero(chunk_size):
    torch.manual_seed(5)
    hidden = torch.randn(17, 32).bfloat16()
    weight = (torch.randn(300, 32) * 0.3).bfloat16()
    ids, teacher_logits, _ = teacher_topk(hidden, weight, 16, chunk_size)
    student_logits = gathered_logits(hidden.clone().requires_grad_(), weight, ids, chunk_size)
    assert teacher_logits.dtype == student_logits.dtype == torch.float32
    assert torch.equal(student_logits, teacher_logits)  # the same computation in both roles
    terms = topk_divergence(student_logits, teacher_logits, "mixed")
    for name in ("loss", "kl_forward", "kl_reverse"):
        assert torch.equal(terms[name], torch.zeros(17)), name


def test_the_rest_bucket_completes_the_full_vocab_probabilities():
    torch.manual_seed(6)
    logits = torch.randn(5, 40, dtype=torch.float64)
    ids = logits.topk(4, -1).indices
    top = logits.gather(-1, ids)
    log_mass = top.logsumexp(-1) - logits.logsumexp(-1)
    buckets = with_rest_bucket(F.log_softmax(top, -1), log_mass).exp()  # (5, 5)
    torch.testing.assert_close(buckets[:, :4], logits.softmax(-1).gather(-1, ids), rtol=0, atol=1e-15)
    torch.testing.assert_close(buckets.sum(-1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-15)
    whole = with_rest_bucket(F.log_softmax(logits, -1), logits.logsumexp(-1) * 0)  # k = V: mass 1, rest ~0
    assert torch.isfinite(whole).all() and float(whole[:, -1].exp().max()) < 1e-30


def test_full_logsumexp_is_the_normaliser_with_its_gradient():
    torch.manual_seed(7)
    hidden = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(full_logsumexp(hidden, weight, 4), (hidden @ weight.T).logsumexp(-1), rtol=0, atol=1e-12)
    torch.autograd.gradcheck(lambda h, w: full_logsumexp(h, w, 4), (hidden, weight))


def _mass_sink(n=12, h=16, v=200, k=8):
    """Teacher and student heads that agree on every row but one "sink" id: the teacher gives it a very low logit,
    the student a very high one. Hidden states all point along the sink's direction, so the sink is never in the
    teacher's top-k, yet holds nearly all of the student's mass."""
    torch.manual_seed(8)
    direction = F.normalize(torch.randn(h, dtype=torch.float64), dim=0)
    hidden = 3.0 * direction + 0.1 * torch.randn(n, h, dtype=torch.float64)
    teacher_w = torch.randn(v, h, dtype=torch.float64)
    teacher_w[0] = -20.0 * direction
    student_w = teacher_w.clone()
    student_w[0] = 20.0 * direction
    return hidden, teacher_w, student_w.requires_grad_(), k


def test_a_student_with_zero_renormalised_kl_but_little_mass_on_the_topk_is_flagged_and_penalised_by_the_tail():
    hidden, teacher_w, student_w, k = _mass_sink()
    ids, teacher_logits, teacher_mass = teacher_topk(hidden, teacher_w, k)
    assert not (ids == 0).any()
    student_logits = gathered_logits(hidden, student_w, ids)
    renormalised = topk_divergence(student_logits, teacher_logits, "mixed")["loss"]
    assert float(renormalised.abs().max()) < 1e-12  # the paper's loss sees nothing wrong
    student_log_mass = student_logits.logsumexp(-1) - full_logsumexp(hidden, student_w)
    assert float(student_log_mass.exp().max()) < 1e-6 < float(teacher_mass.min())  # the drift monitor flags it
    tail = topk_divergence(student_logits, teacher_logits, "mixed", student_log_mass=student_log_mass,
                           teacher_log_mass=teacher_mass.log())["loss"]
    assert float(tail.min()) > 1.0  # the tail term penalises it
    tail.sum().backward()
    assert float(student_w.grad[0] @ F.normalize(hidden.mean(0), dim=0)) > 0  # descent lowers the sink's logit


def test_the_tail_term_is_zero_for_identical_models_and_needs_both_masses():
    hidden, teacher_w, _, k = _mass_sink()
    ids, logits, mass = teacher_topk(hidden, teacher_w, k)
    log_mass = gathered_logits(hidden, teacher_w, ids).logsumexp(-1) - full_logsumexp(hidden, teacher_w)
    tail = topk_divergence(logits, logits, "reverse", student_log_mass=log_mass, teacher_log_mass=log_mass)
    assert float(tail["loss"].abs().max()) < 1e-12
    with pytest.raises(ValueError, match="both"):
        topk_divergence(logits, logits, "reverse", student_log_mass=log_mass)


@pytest.mark.parametrize("budget", [1 << 24, 24 * 7])  # one block; blocks of 7 vocabulary rows and 7 pairs
def test_half_precision_head_gradient_is_the_float32_sum_rounded_once(monkeypatch, budget):
    import sdzero_pl.core.losses as losses

    monkeypatch.setattr(losses, "_ROWS_BUDGET", budget)
    torch.manual_seed(9)
    ids = torch.randint(0, 500, (37, 8))
    grad = torch.randn(37, 8)
    hidden = torch.randn(37, 24).bfloat16().requires_grad_()
    weight = (torch.randn(500, 24) * 0.1).bfloat16().requires_grad_()
    gathered_logits(hidden, weight, ids, 5).backward(grad)
    hidden32 = hidden.detach().float().requires_grad_()
    weight32 = weight.detach().float().requires_grad_()
    gathered_logits(hidden32, weight32, ids, 5).backward(grad)
    assert weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(weight.grad, weight32.grad.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(hidden.grad, hidden32.grad.bfloat16(), rtol=0, atol=0)
