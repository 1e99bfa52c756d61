import math

import pytest
import torch
import torch.nn.functional as F
from helpers import queue_of
from reference import classic_sinkhorn
from torch.utils._python_dispatch import TorchDispatchMode

from ignite_swav import sinkhorn


def cosine_scores(rows: int, prototypes: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(rows, dim, generator=g), dim=1)
    c = F.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    return z @ c.t()


def test_rows_sum_to_one_and_dtype():
    codes = sinkhorn(cosine_scores(32, 10))
    assert codes.shape == (32, 10)
    assert codes.dtype == torch.float32
    assert torch.allclose(codes.sum(dim=1), torch.ones(32), atol=1e-6)
    assert (codes >= 0).all()


@pytest.mark.parametrize("iterations,epsilon", [(1, 0.05), (3, 0.05), (3, 0.03), (10, 0.1)])
def test_matches_the_classic_matrix_loop(iterations, epsilon):
    scores = cosine_scores(48, 20, seed=iterations)
    expected = classic_sinkhorn(scores, iterations, epsilon)
    got = sinkhorn(scores, iterations=iterations, epsilon=epsilon)
    assert torch.allclose(got.double(), expected, atol=1e-6, rtol=1e-5)


def test_extra_rows_join_the_equipartition_but_only_the_batch_rows_are_returned():
    batch, queue = cosine_scores(16, 12, seed=1), cosine_scores(64, 12, seed=2)
    expected = classic_sinkhorn(torch.cat([batch, queue]))[:16]
    got = sinkhorn(batch, queue)
    assert got.shape == (16, 12)
    assert torch.allclose(got.double(), expected, atol=1e-6, rtol=1e-5)
    # The queue changes the result: it is not ignored.
    assert not torch.allclose(got, sinkhorn(batch), atol=1e-3)


def test_more_iterations_equipartition_the_prototypes():
    codes = sinkhorn(cosine_scores(200, 10, seed=3), iterations=50)
    assert torch.allclose(codes.sum(dim=0), torch.full((10,), 20.0), rtol=1e-3)


def test_unnormalised_scores_do_not_overflow():
    scores = cosine_scores(32, 8, seed=4) * 10  # exp(10 / 0.05) overflows float32
    assert not torch.isfinite(torch.exp(scores / 0.05)).all()
    got = sinkhorn(scores)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), classic_sinkhorn(scores), atol=1e-5)


def test_extreme_scores_give_finite_codes_that_sum_to_one():
    from reference import log_domain_sinkhorn

    scores = torch.randn(64, 30, generator=torch.Generator().manual_seed(0)) * 1000
    got = sinkhorn(scores)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.sum(dim=1), torch.ones(64), atol=1e-5)
    # beyond what the classic loop can compute, still the exact algorithm (written in the log domain)
    assert (got.double() - log_domain_sinkhorn(scores)).abs().max() < 1e-4


def test_runs_in_float32_outside_autocast():
    scores = cosine_scores(16, 8, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sinkhorn(scores.bfloat16())
    assert got.dtype == torch.float32
    assert torch.allclose(got, sinkhorn(scores.bfloat16().float()), atol=1e-6)


def test_no_gradient_flows_through_the_codes():
    scores = cosine_scores(8, 4).requires_grad_()
    assert not sinkhorn(scores).requires_grad


def test_uniform_scores_give_uniform_codes():
    codes = sinkhorn(torch.zeros(6, 5))
    assert torch.allclose(codes, torch.full((6, 5), 0.2))
    assert math.isclose(float(codes.sum()), 6.0, rel_tol=1e-6)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"scores": torch.zeros(4)}, ValueError, r"scores must have shape \(N, K\).*\(4,\)"),
        ({"scores": [[0.0, 1.0]]}, TypeError, "scores must be a torch.Tensor"),
        ({"scores": torch.zeros(3, 2, dtype=torch.long)}, TypeError, "floating point.*int64"),
        ({"scores": torch.zeros(0, 5)}, ValueError, "at least one row"),
        ({"scores": torch.zeros(3, 2), "iterations": 0}, ValueError, "iterations must be an integer >= 1, got 0"),
        ({"scores": torch.zeros(3, 2), "iterations": 2.5}, TypeError, "iterations must be an integer"),
        ({"scores": torch.zeros(3, 2), "epsilon": 0.0}, ValueError, "epsilon must be a positive finite number"),
        ({"scores": torch.zeros(3, 2), "epsilon": -1}, ValueError, "epsilon must be a positive finite number, got -1"),
        ({"scores": torch.tensor([[0.0, float("nan")]])}, ValueError, "NaN or infinite"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(kwargs, error, message):
    with pytest.raises(error, match=message):
        sinkhorn(**kwargs)


def test_extra_scores_with_other_prototype_count_are_refused():
    with pytest.raises(ValueError, match="extra_scores must have 4 columns"):
        sinkhorn(torch.zeros(2, 4), torch.zeros(3, 5))


# every (epsilon, score range) with epsilon down to 0.01 and scores up to +-50 where exp(scores / epsilon) fits
# float64, so that the classic loop gives a reference
EXACT_CASES = [
    (e, r) for e in (0.05, 0.03, 0.02, 0.01) for r in (1.0, 2.0, 5.0, 10.0, 20.0, 35.0, 50.0) if r / e <= 700
]


@pytest.mark.parametrize("epsilon,score_range", EXACT_CASES)
def test_codes_stay_exact_wherever_the_float64_loop_is_finite(epsilon, score_range):
    g = torch.Generator().manual_seed(int(score_range * 100 + epsilon * 1000))
    scores = (torch.rand(96, 40, generator=g) * 2 - 1) * score_range
    extra = (torch.rand(160, 40, generator=g) * 2 - 1) * score_range
    # a few prototypes far below every row's best score, as in a collapsing or early model
    scores[:, :5] -= score_range / 2
    extra[:, :5] -= score_range / 2
    expected = classic_sinkhorn(torch.cat([scores, extra]), 3, epsilon)[:96]
    assert torch.isfinite(expected).all()
    got = sinkhorn(scores, extra, iterations=3, epsilon=epsilon)
    assert (got.double() - expected).abs().max() < 1e-4
    assert torch.allclose(got.sum(dim=1), torch.ones(96), atol=1e-5)


def test_the_classic_loop_and_its_log_domain_form_agree():
    from reference import log_domain_sinkhorn

    scores = cosine_scores(40, 12, seed=7)
    assert torch.allclose(log_domain_sinkhorn(scores, 3, 0.05), classic_sinkhorn(scores, 3, 0.05), atol=1e-12)


def test_inputs_that_used_to_fail_inside_torch_or_give_nan_get_a_clear_answer():
    with pytest.raises(ValueError, match=r"at least one row and one column \(prototype\), got shape \(4, 0\)"):
        sinkhorn(torch.zeros(4, 0))
    with pytest.raises(ValueError, match="'meta' device, which holds no values"):
        sinkhorn(torch.zeros(4, 3, device="meta"))
    # float64 scores beyond float32's range: worked on in float64, finite codes (one row: uniform, as balanced)
    codes = sinkhorn(torch.tensor([[1e300, -1e300, 0.0]], dtype=torch.float64))
    assert torch.allclose(codes, torch.full((1, 3), 1 / 3))
    # an epsilon that makes scores / epsilon overflow is refused, naming epsilon
    with pytest.raises(ValueError, match="epsilon=1e-39 is too small for these scores"):
        sinkhorn(torch.tensor([[1e300, 0.0]], dtype=torch.float64), epsilon=1e-39)
    # a tiny epsilon with ordinary scores: hard assignments, finite
    codes = sinkhorn(cosine_scores(8, 4), epsilon=1e-39)
    assert torch.isfinite(codes).all() and torch.allclose(codes.sum(dim=1), torch.ones(8))


def _worst_cosine_case(seed: int, rows: int = 576, prototypes: int = 100, dim: int = 16) -> torch.Tensor:
    """Cosine scores at the extremes: most embeddings equal to one prototype (score 1), five prototypes
    opposite to them (score -1), the rest spread over other prototypes."""
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    d = F.normalize(torch.randn(1, dim, generator=g), dim=1)
    c[:5], c[5] = -d, d
    z = d.expand(rows, dim).clone()
    z[::7] = c[10 + torch.arange(len(z[::7])) % (prototypes - 10)]
    return (z @ c.t()).clamp(-1, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_float32_kernel_is_exact_at_its_limit_on_cosine_scores_of_plus_and_minus_one(seed):
    from reference import log_domain_sinkhorn

    from ignite_swav.sinkhorn import KERNEL_SPREAD, sinkhorn_method

    scores = _worst_cosine_case(seed)
    epsilon = 2.04 / KERNEL_SPREAD  # the smallest epsilon the loss works on with the kernel (scores up to 1.02)
    assert sinkhorn_method(2.04 / epsilon) == ("kernel", torch.float32)
    got = sinkhorn(scores[:64], scores[64:], epsilon=epsilon, max_abs_score=1.02)
    expected = log_domain_sinkhorn(scores, 3, epsilon)[:64]
    assert (got.double() - expected).abs().max() < 1e-5


def _isolated_prototype_case(seed: int, rows: int = 576, prototypes: int = 100, dim: int = 16) -> torch.Tensor:
    """Cosine scores where prototype 0 is 2.04 below every row's best: at a small epsilon its whole column of
    exp(scores / epsilon) underflows float32, yet the equipartition gives it a share of every row."""
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    nearest = c[1 + torch.randint(prototypes - 1, (rows,), generator=g)]
    z = F.normalize(nearest + 0.2 * torch.randn(rows, dim, generator=g), dim=1)
    scores = z @ c.t()
    scores[:, 0] = scores[:, 1:].amax(dim=1) - 2.04
    return scores


@pytest.mark.parametrize("epsilon", [0.02, 0.015, 0.01])
def test_below_the_kernels_limit_the_stabilised_float32_iterations_stay_exact(epsilon):
    from reference import log_domain_sinkhorn

    from ignite_swav.sinkhorn import codes_from_rows, sinkhorn_method

    scores = _isolated_prototype_case(seed=int(epsilon * 1000))
    method = sinkhorn_method(2.04 / epsilon)
    assert method == ("stabilised", torch.float32)
    expected = log_domain_sinkhorn(scores, 3, epsilon)[:64]
    got = codes_from_rows(scores.clone().unsqueeze(0), 64, 3, epsilon, method)[0]
    assert (got.double() - expected).abs().max() < 1e-5
    # the plain float32 kernel loses the isolated prototype's column here (this case would catch a wrong choice)
    plain = codes_from_rows(scores.clone().unsqueeze(0), 64, 3, epsilon, ("kernel", torch.float32))[0]
    assert (plain.double() - expected).abs().max() > 0.1


class DtypeRecorder(TorchDispatchMode):
    """The dtypes of every tensor an operation returns while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor):
                self.dtypes.add(value.dtype)
        return out


@pytest.mark.parametrize("epsilon", [0.05, 0.03, 0.02, 0.01])
def test_the_loss_computes_no_float64_at_any_epsilon_from_0_01(epsilon):
    from ignite_swav import SwAVLoss

    g = torch.Generator().manual_seed(0)
    prototypes = F.normalize(torch.randn(30, 8, generator=g), dim=1)
    embeddings = [F.normalize(torch.randn(16, 8, generator=g), dim=1).requires_grad_() for _ in range(4)]
    loss_fn = SwAVLoss(epsilon=epsilon)
    loss_fn.queue = queue_of(F.normalize(torch.randn(2, 32, 8, generator=g), dim=2))
    with DtypeRecorder() as recorded:
        loss = loss_fn(scores=[z @ prototypes.t() for z in embeddings], embeddings=embeddings, prototypes=prototypes)
        loss.backward()
    assert loss_fn.queue_in_use
    assert torch.float32 in recorded.dtypes and torch.float64 not in recorded.dtypes, recorded.dtypes


def test_a_known_bound_on_the_scores_reads_nothing_from_the_device():
    from helpers import DispatchCounter

    scores, queue = cosine_scores(16, 10, seed=1), cosine_scores(48, 10, seed=2)
    with DispatchCounter() as bounded:
        got = sinkhorn(scores, queue, max_abs_score=1.0)
    with DispatchCounter() as measured:
        expected = sinkhorn(scores, queue)
    assert bounded.synchronisations == 0 and measured.synchronisations > 0
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), "1", True])
def test_a_bad_bound_is_refused(value):
    with pytest.raises(ValueError, match=r"max_abs_score must be a positive finite number \(1.0 for cosine scores\)"):
        sinkhorn(torch.zeros(3, 2), max_abs_score=value)
