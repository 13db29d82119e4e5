"""The 2-D quadratic of the paper's Section 3 (companion.quadratic, notebook 00)."""

import math

import torch

from companion import quadratic as Q


def instances(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        kappa = float(torch.exp(torch.rand((), generator=g, dtype=torch.float64) * math.log(1000)))
        yield kappa, Q.random_quadratic(kappa, g), Q.random_start(g)


def test_random_quadratic_has_the_asked_condition_number():
    for kappa, a, _ in instances():
        lo, hi = torch.linalg.eigvalsh(a).tolist()
        assert math.isclose(hi / lo, kappa, rel_tol=1e-9) and math.isclose(hi, 1.0, rel_tol=1e-12)


def test_exact_step_minimises_f_along_the_gradient():
    for _, a, x in instances():
        g = a @ x
        h = Q.exact_step(a, x)
        for nearby in (h * 0.99, h * 1.01):
            assert Q.value(a, x - h * g) < Q.value(a, x - nearby * g)


def test_exact_line_search_never_breaks_bound_4_and_fixed_step_meets_it():
    for _, a, x in instances():
        bound = Q.decrease_bound(a)
        exact = Q.per_step_factors(Q.run_exact_line_search(a, x, 30)["f"])
        assert (exact <= bound + 1e-12).all()
        fixed = Q.run_fixed_step(a, x, 400, Q.best_fixed_step(a))
        assert math.isclose(Q.asymptotic_factor(fixed["f"], 200), bound, rel_tol=1e-6) or bound < 1e-3


def test_lossgrad_grows_h_exactly_while_it_is_below_the_exact_step():
    for _, a, x in instances(5):
        run = Q.run_lossgrad(a, x, 150, h0=1e-2, c=1.1, rollback=None, resolution_guard=False)
        h, h_star = run["h"], run["h_star"]
        grew = h[1:] > h[:-1]
        assert torch.equal(grew, h[:-1] <= h_star[:-1])
        assert Q.first_overshoot(run) < len(h)


def test_slice_ratio_crosses_one_half_at_the_exact_step_on_a_quadratic():
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    x = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    h_star = Q.exact_step(a, x.detach()).item()
    s = Q.slice_along_gradient(lambda: Q.value(a, x), [x], torch.linspace(0.01, 3, 300, dtype=torch.float64) * h_star)
    ratio = Q.ratio_along(s)
    assert torch.allclose(ratio, s["t"] / (2 * h_star), atol=1e-12)
    assert torch.equal(x.detach(), torch.tensor([1.0, -1.0], dtype=torch.float64))  # restored
    parabola = Q.parabola(s, 1.3 * h_star)
    assert torch.allclose(parabola(s["t"]), s["phi"], atol=1e-9)  # a quadratic is its own parabola


def rounding_amplification(a, x0, h):
    """How much the rounding of each step can grow by step k of gradient descent x <- x - h_k A x from x0 with
    the step sizes h, as a factor on the float64 epsilon: S_k = 1 + sum over j < k of |x_j| / min_i |y_ji|,
    y_j being x_j in A's eigenbasis.

    Why: the step is linear, y_{k+1,i} = (1 - h_k lambda_i) y_ki, so a rounding error of size eps |x_j| made at
    step j in direction i is carried to step k by the same factors as y_ji itself: relative to y_ki it stays
    eps |x_j| / |y_ji|. A run whose component along one eigenvector shrinks far below |x| (damped while h was
    small) and then grows back (when h overshoots 2/lambda_1) thus carries a relative error of eps |x| / |y_i|
    at its smallest, which no rounding-free order of operations avoids, and which the CPU's kernels (MKL's,
    ATen's vector width) decide within that bound. f = 1/2 sum lambda_i y_i^2 then errs by twice that."""
    lam, q = torch.linalg.eigh(a)
    y = q.T @ x0
    terms = [1.0]
    for step in h:
        terms.append((y.norm() / y.abs().min()).item())
        y = y * (1 - step * lam)
    return torch.tensor(terms, dtype=torch.float64).cumsum(0)


def test_batched_runs_agree_with_the_real_optimizer_and_the_loops():
    eps = torch.finfo(torch.float64).eps
    g = torch.Generator().manual_seed(3)
    kappa, a, x0 = Q.random_problems(4, 100.0, g)
    batched = {m: Q.run_batched(a, x0, 200, m, h0=1e-3, c=1.1) for m in ("exact", "fixed", "lossgrad")}
    for i in range(4):
        loops = {"exact": Q.run_exact_line_search(a[i], x0[i], 200),
                 "fixed": Q.run_fixed_step(a[i], x0[i], 200, Q.best_fixed_step(a[i])),
                 "lossgrad": Q.run_lossgrad(a[i], x0[i], 200, h0=1e-3, c=1.1, rollback=None, resolution_guard=False)}
        for method, loop in loops.items():
            n = len(loop["h"])
            assert torch.allclose(batched[method]["h"][i, :n], loop["h"], rtol=1e-12, atol=0), method
            # f agrees to rounding: the optimizer's fused x - h*g and the batched form round differently. 1e-6
            # relative, except where the run's own dynamics amplify rounding beyond it: problem 2's LOSSGRAD run
            # damps one eigen-component far below |x| before it overshoots (f climbs to 3e10), and its f then
            # agrees to 1e-5 under MKL's AVX2 kernels, 2e-8 under its SSE2 ones (the same h, bitwise). There the
            # bound is 4 eps S_k: measured at most 0.3 eps S_k under every code path of one CPU (MKL: AVX2,
            # SSE2; ATen: AVX-512, AVX2, none); the other 11 runs stay within 1e-6 (at most 6e-10 measured)
            rtol = torch.clamp(4 * eps * rounding_amplification(a[i], x0[i], loop["h"]), min=1e-6)
            assert rtol.max() < 1e-2, (method, rtol.max())  # never a bound that passes anything
            error = (batched[method]["f"][i, : n + 1] - loop["f"]).abs()
            assert (error <= rtol * loop["f"].abs()).all(), (method, (error / loop["f"].abs() / rtol).max())


def test_rounding_amplification_sums_how_far_the_smallest_eigen_component_sits_below_the_iterate():
    a = torch.eye(2, dtype=torch.float64)
    x0 = torch.tensor([1.0, 1e-6], dtype=torch.float64)  # the second component 1e6-fold below |x|, at every step
    s = rounding_amplification(a, x0, torch.full((50,), 0.5, dtype=torch.float64))
    assert torch.allclose(s, 1 + torch.arange(51, dtype=torch.float64) * math.hypot(1.0, 1e-6) / 1e-6, rtol=1e-12)
