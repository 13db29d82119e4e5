"""companion.probes: which dropout masks LOSSGRAD's probe sees (matched, fresh, eval), and notebook 08's readings."""

import math

import pytest
import torch
import torch.nn.functional as F

from companion import models, store, train
from companion.probes import (PROBES, DropoutProbeClassification, log_h_dispersion, mnist_mlp_dropout,
                              probe_closure, probe_noise_share)
from lossgrad import LossGrad

EXACT = dict(rollback=None, resolution_guard=False)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def batch(seed=0, n=32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def model_at(p, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return mnist_mlp_dropout(p, init_std=0.05).to(device)


def rng_state(device):
    """The generators dropout draws from on ``device`` (the CPU's, and the GPU's on a GPU)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None


def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def same_state(a, b):
    return torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1]))


def one_step(probe, p=0.5, lr=0.05, via_task=False, device="cpu"):
    """One exact LOSSGRAD step from the same point, weights and random state: (x', last, rng after, loss at x' with
    the forward pass's masks, loss at x' in eval mode)."""
    model, (x, y) = model_at(p, device=device), batch(device=device)
    torch.manual_seed(123)
    rng_at_x = rng_state(device)
    opt = LossGrad(model.parameters(), lr=lr, **EXACT)
    if via_task:  # the route of the notebook: the task through train_step (with the batch-accuracy closure)
        train.train_step(model, opt, DropoutProbeClassification(probe), (x, y), step_metrics={})
    else:
        opt.step(probe_closure(lambda: F.cross_entropy(model(x), y), model, probe))
    rng_after = rng_state(device)
    with torch.no_grad():
        set_rng_state(rng_at_x, device)
        replayed = F.cross_entropy(model(x), y).item()  # x' with the masks the forward pass at x drew
        model.eval()
        deterministic = F.cross_entropy(model(x), y).item()
        model.train()
    last = {k: v.item() for k, v in opt.last.items() if k in ("loss", "probe_loss")}
    return [t.detach().clone() for t in model.parameters()], last, rng_after, replayed, deterministic


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("via_task", [False, True], ids=["probe_closure", "task"])
def test_each_probe_sees_its_masks_at_the_same_point(via_task, device):
    x_prime, last, rng, replayed, deterministic = {}, {}, {}, {}, {}
    for probe in PROBES:
        x_prime[probe], last[probe], rng[probe], replayed[probe], deterministic[probe] = one_step(
            probe, via_task=via_task, device=device)
    for probe in PROBES:  # the same forward pass, gradient and step: the same x'
        assert all(torch.equal(a, b) for a, b in zip(x_prime[probe], x_prime["matched"]))
        assert last[probe]["loss"] == last["matched"]["loss"]
        assert same_state(rng[probe], rng["matched"])  # no probe moves the training stream
    assert last["matched"]["probe_loss"] == replayed["matched"]  # the forward pass's masks, exactly
    assert last["fresh"]["probe_loss"] != replayed["fresh"]  # other masks at the same x'
    assert last["fresh"]["probe_loss"] != last["matched"]["probe_loss"]
    assert last["fresh"]["probe_loss"] != deterministic["fresh"]  # still dropout, not eval mode
    assert last["eval"]["probe_loss"] == deterministic["eval"]  # dropout off, exactly
    assert last["eval"]["probe_loss"] != last["matched"]["probe_loss"]


@pytest.mark.parametrize("probe", PROBES)
def test_a_probe_at_x_itself(probe):
    """LOSSGRAD over a parameter with zero gradient: x' = x, so the probe evaluates the same point as the forward
    pass. Matched masks reproduce its loss exactly; fresh masks do not; eval mode gives the eval-mode loss."""
    model, (x, y) = model_at(0.5), batch()
    still = torch.zeros(1, requires_grad=True)
    torch.manual_seed(7)
    rng_at_x = torch.get_rng_state()
    opt = LossGrad([still], lr=0.1, **EXACT)
    loss = opt.step(probe_closure(lambda: F.cross_entropy(model(x), y) + 0.0 * still.sum(), model, probe))
    assert model.training
    with torch.no_grad():
        model.eval()
        eval_loss = F.cross_entropy(model(x), y)
        model.train()
        torch.set_rng_state(rng_at_x)
        forward_again = F.cross_entropy(model(x), y)
    assert float(opt.last["sq_grad_norm"]) == 0.0 and still.item() == 0.0
    assert loss.item() == forward_again.item()  # the random state replayed, the same masks
    probe_loss = opt.last["probe_loss"].item()
    if probe == "matched":
        assert probe_loss == loss.item()
    elif probe == "fresh":
        assert probe_loss != loss.item() and probe_loss != eval_loss.item()
    else:
        assert probe_loss == eval_loss.item() != loss.item()


@pytest.mark.parametrize("device", DEVICES)
def test_fresh_masks_are_new_every_step_and_deterministic(device):
    def probe_losses():
        model, (x, y) = model_at(0.3, device=device), batch(device=device)
        torch.manual_seed(11)
        still = torch.zeros(1, requires_grad=True, device=device)  # x' = x every step: only the masks change the probe
        opt = LossGrad([still], lr=0.1, **EXACT)
        closure = probe_closure(lambda: F.cross_entropy(model(x), y) + 0.0 * still.sum(), model, "fresh")
        out = []
        for _ in range(4):
            opt.step(closure)
            out.append((opt.last["loss"].item(), opt.last["probe_loss"].item()))
        return out

    first, second = probe_losses(), probe_losses()
    assert first == second  # a rerun draws the same fresh masks
    assert len({probe for _, probe in first}) == 4  # new masks every step
    assert all(loss != probe for loss, probe in first)


def test_at_p_zero_every_probe_is_the_same():
    losses = {probe: one_step(probe, p=0.0)[1]["probe_loss"] for probe in PROBES}
    assert len(set(losses.values())) == 1


def test_eval_probe_restores_each_modules_mode():
    model, (x, y) = model_at(0.5), batch()
    model[2].eval()  # one dropout layer frozen in eval mode by the user
    opt = LossGrad(model.parameters(), lr=0.05, **EXACT)
    opt.step(probe_closure(lambda: F.cross_entropy(model(x), y), model, "eval"))
    assert [m.training for m in model.modules()] == [True, True, True, False] + [True] * (len(list(model.modules())) - 4)


def test_the_forward_pass_and_other_optimizers_are_untouched():
    for probe in PROBES:
        model, (x, y) = model_at(0.5), batch()
        torch.manual_seed(5)
        loss = DropoutProbeClassification(probe).loss(model, (x, y))  # autograd on: the forward pass
        torch.manual_seed(5)
        assert loss.item() == F.cross_entropy(model(x), y).item()


def test_probe_mode_is_part_of_the_run_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path))
    data = (torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    identities = []
    for probe in PROBES:
        exp = train.Experiment("08_test", "smoke", data, data, DropoutProbeClassification(probe), mnist_mlp_dropout,
                               epochs=1, batch_size=4, device=torch.device("cpu"), model_options=dict(p=0.5))
        identity = exp.identity("lossgrad", 0, lr=1e-4)
        assert identity["task"] == {"class": "DropoutProbeClassification", "probe": probe}
        assert identity["model_options"] == {"p": 0.5}
        identities.append(store.config_digest(identity))
    assert len(set(identities)) == len(PROBES)


def test_unknown_probe_and_p_are_refused():
    with pytest.raises(ValueError, match="probe must be one of"):
        DropoutProbeClassification("train")
    with pytest.raises(ValueError, match="probe must be one of"):
        probe_closure(lambda: torch.zeros(()), torch.nn.Linear(1, 1), "new")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        mnist_mlp_dropout(1.0)


def test_dropout_mlp_is_the_paper_mlp_with_dropout_after_every_hidden_layer():
    model = model_at(0.3)
    torch.manual_seed(0)
    plain = models.mnist_mlp(init_std=0.05)
    assert [type(m).__name__ for m in model] == ["Flatten", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout",
                                                 "Linear", "ReLU", "Dropout", "Linear"]
    assert all(m.p == 0.3 for m in model if isinstance(m, torch.nn.Dropout))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    x = batch()[0]
    model.eval()
    assert torch.equal(model(x), plain(x))


def test_probe_noise_share_reads_measured_over_predicted_from_the_ratio():
    model, (x, y) = model_at(0.5), batch()
    opt = LossGrad(model.parameters(), lr=0.05, **EXACT)
    closure = probe_closure(lambda: F.cross_entropy(model(x), y), model, "fresh")
    for _ in range(5):
        h = float(opt.param_groups[0]["lr"])
        opt.step(closure)
        last = opt.last
        measured = abs(last["probe_loss"].item() - last["loss"].item()) / (h * last["sq_grad_norm"].item())
        assert abs(last["ratio"].item() - 1) == pytest.approx(measured, rel=1e-9)
    ratios = torch.tensor([1.0, 12.0, -9.5, 0.4, math.nan, 10.5, -8.0])  # |r - 1|: 0, 11, 10.5, 0.6, -, 9.5, 9
    assert probe_noise_share(ratios) == pytest.approx(2 / 6)
    assert probe_noise_share(torch.tensor([0.5, 0.5]), factor=0.4) == 1.0
    assert math.isnan(probe_noise_share(torch.tensor([math.nan])))


def test_log_h_dispersion():
    assert log_h_dispersion([0.1] * 10, 5) == 0.0
    h = torch.tensor([9.0, 1.0, math.e, 1.0, math.e, 1.0, math.e])
    assert log_h_dispersion(h, 6) == pytest.approx(float(torch.tensor([0.0, 1, 0, 1, 0, 1]).std()))
    assert math.isnan(log_h_dispersion([1.0, 0.0, 1.0], 3))
    with pytest.raises(ValueError):
        log_h_dispersion([1.0, 2.0], 3)
