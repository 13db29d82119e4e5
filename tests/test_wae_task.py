"""Tests for the WAE-MMD task of companion/models.py (WAEMMDTask), its small stand-in network and the
WAE paper's optimizer, as the training loop of companion/train.py uses them."""

import pytest
import torch

from companion import data as D
from companion import models as M
from companion import train as T
from lossgrad import LossGrad


@pytest.fixture
def images():
    return D.synthetic_celeba(n_train=32, n_test=16, seed=0)


def _small_model(seed=0, latent=8):
    torch.manual_seed(seed)
    return M.SmallWAE(latent=latent, width=4)


# ----------------------------------------------------------------------------- prior samples
def test_attach_prior_is_fresh_per_batch_and_reproducible_from_the_generator(images):
    task = M.WAEMMDTask(latent=8, prior_var=2.0)
    batch = (images["train"][:16],)
    g = torch.Generator().manual_seed(3)
    first, second = task.attach_prior(batch, g), task.attach_prior(batch, g)
    assert first[0] is batch[0] and first[1].shape == (16, 8)
    assert not torch.equal(first[1], second[1])  # a new sample for every training batch
    again = task.attach_prior(batch, torch.Generator().manual_seed(3))
    assert torch.equal(first[1], again[1])  # ... drawn from the run's generator only
    replaced = task.attach_prior(first, torch.Generator().manual_seed(4))
    assert len(replaced) == 2 and not torch.equal(replaced[1], first[1])


def test_with_prior_is_fixed_by_its_seed_and_has_the_prior_variance():
    task = M.WAEMMDTask(latent=16, prior_var=2.0)
    split = (torch.zeros(4000, 3, 64, 64, dtype=torch.uint8),)
    a, b, c = task.with_prior(split, seed=1), task.with_prior(split, seed=1), task.with_prior(split[0], seed=2)
    assert a[0] is split[0] and c[0] is split[0] and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    assert a[1].var().item() == pytest.approx(2.0, rel=0.05)


def test_batches_without_a_prior_sample_are_refused_with_a_hint(images):
    task, model = M.WAEMMDTask(latent=8), _small_model()
    with pytest.raises(ValueError, match="attach_prior"):
        task.loss(model, (images["train"][:4],))
    with pytest.raises(ValueError, match="shape"):
        task.loss(model, (images["train"][:4], torch.zeros(4, 3)))


# ----------------------------------------------------------------------------- loss and evaluate
def test_loss_is_wae_loss_on_unit_images_and_the_batch_prior(images):
    task, model = M.WAEMMDTask(latent=8, lam=7.0, prior_var=2.0), _small_model()
    x8 = images["train"][:8]
    batch = task.attach_prior((x8,), torch.Generator().manual_seed(0))
    x = x8.float() / 255
    recon, z = model(x)
    expected = M.wae_loss(x, recon, z, lam=7.0, z_prior=batch[1], prior_var=2.0)
    assert task.loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    assert task.loss(model, (x, batch[1])).item() == pytest.approx(expected.item(), rel=1e-5)  # float input
    assert task.loss(model, batch).item() == task.loss(model, batch).item()  # same batch, same value


def test_lossgrad_probe_measures_the_same_objective_as_the_step(images):
    """The probe's loss must be the objective at x' on the SAME batch and prior sample."""
    task, model = M.WAEMMDTask(latent=8), _small_model()
    batch = task.attach_prior((images["train"][:16],), torch.Generator().manual_seed(0))
    opt = LossGrad(model.parameters(), lr=1e-4, rollback=None, resolution_guard=False)
    opt.zero_grad()
    opt.step(lambda: task.loss(model, batch))
    with torch.no_grad():  # train mode: batch-norm uses the batch statistics, as in the probe
        after = task.loss(model, batch)
    assert opt.last["probe_loss"].item() == pytest.approx(after.item(), rel=1e-6)


def test_evaluate_sums_give_consistent_means(images):
    task, model = M.WAEMMDTask(latent=8, lam=10.0), _small_model()
    test = task.with_prior(images["test"], seed=0)
    got = T.evaluate(model, task, test, torch.device("cpu"), batch_size=8)
    assert set(got) == set(task.metrics)
    assert got["mse"] == pytest.approx(got["recon"] / (3 * 64 * 64), rel=1e-6)
    assert got["loss"] == pytest.approx(got["recon"] + 10.0 * got["mmd"], rel=1e-6)
    # the whole split in one batch: the MMD estimate of all 16 codes against their 16 prior samples
    x = test[0].float() / 255
    model.eval()
    with torch.no_grad():
        _, z = model(x)
        whole = T.evaluate(model, task, test, torch.device("cpu"), batch_size=16)
    assert whole["mmd"] == pytest.approx(M.mmd_penalty(z, test[1], 2.0).item(), rel=1e-5)
    assert whole["mse"] == pytest.approx(got["mse"], rel=1e-6)  # per image: independent of batching


def test_evaluate_counts_a_single_image_batch_without_failing(images):
    task, model = M.WAEMMDTask(latent=8), _small_model()
    test = task.with_prior(images["test"][:9], seed=0)
    got = T.evaluate(model, task, test, torch.device("cpu"), batch_size=8)  # batches of 8 and 1
    assert all(torch.isfinite(torch.tensor(v)) for v in got.values())


def test_mean_reduction_reports_per_pixel_reconstruction(images):
    task, model = M.WAEMMDTask(latent=8, reduction="mean"), _small_model()
    got = T.evaluate(model, task, task.with_prior(images["test"]), torch.device("cpu"), batch_size=16)
    assert got["recon"] == pytest.approx(got["mse"], rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        M.WAEMMDTask(reduction="max")


# ----------------------------------------------------------------------------- pictures, network
def test_reconstruct_and_generate_give_images_and_keep_the_mode(images):
    task, model = M.WAEMMDTask(latent=8), _small_model()
    model.train()
    rec = task.reconstruct(model, images["test"][:5], torch.device("cpu"))
    gen = task.generate(model, 6, torch.device("cpu"), seed=1)
    assert rec.shape == (5, 3, 64, 64) and gen.shape == (6, 3, 64, 64)
    assert 0 <= float(rec.min()) and float(rec.max()) <= 1 and model.training
    assert torch.equal(gen, task.generate(model, 6, torch.device("cpu"), seed=1))


def test_small_wae_has_the_wae_interface():
    model = _small_model(latent=5)
    recon, z = model(torch.rand(3, 3, 64, 64))
    assert recon.shape == (3, 3, 64, 64) and z.shape == (3, 5) and model.latent == 5
    assert model.decoder(torch.randn(2, 5)).shape == (2, 3, 64, 64)


# ----------------------------------------------------------------------------- training loop
def _fit(task, images, seed):
    model = _small_model(seed)
    opt = LossGrad(model.parameters(), lr=1e-4, rollback=None, resolution_guard=False)
    return T.fit(model, opt, task, (images["train"],), task.with_prior(images["test"]), epochs=2, batch_size=16,
                 device=torch.device("cpu"), seed=seed, augment=task.attach_prior, eval_train=False,
                 progress=False)


def test_training_with_lossgrad_runs_and_is_reproducible(images):
    task = M.WAEMMDTask(latent=8)
    a, b = _fit(task, images, seed=0), _fit(task, images, seed=0)
    assert not a["diverged"] and len(a["steps"]["ratio"]) == 4
    assert torch.equal(a["steps"]["loss"], b["steps"]["loss"])
    assert torch.equal(a["steps"]["ratio"], b["steps"]["ratio"])
    assert a["epochs"][-1]["test_loss"] == b["epochs"][-1]["test_loss"]


# ----------------------------------------------------------------------------- helpers the notebooks 06/07 use
def test_random_subset_is_seeded_and_not_the_first_examples():
    labels = torch.cat([torch.zeros(500), torch.ones(500)])  # ordered like the IMDb files
    split = (torch.arange(1000), labels)
    a, b = D.random_subset(split, 200, seed=0), D.random_subset(split, 200, seed=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], labels[a[0]])  # rows stay aligned
    assert len(set(a[0].tolist())) == 200 and 0.35 < float(a[1].mean()) < 0.65
    assert not torch.equal(a[0], D.random_subset(split, 200, seed=1)[0])
    assert D.random_subset(split, None) is split
    with pytest.raises(ValueError, match="count"):
        D.random_subset(split, 1001)


def test_ratio_summary_recovers_the_curvature_of_a_quadratic():
    """On f(x) = kappa/2 ||x||^2 the ratio is exactly h*kappa/2: the summary must return kappa, and
    LOSSGRAD's h must settle at the line-search step 1/kappa (within its factor c)."""
    from companion import report as R

    kappa = 40.0
    x = torch.nn.Parameter(torch.ones(5))
    opt = LossGrad([x], lr=1e-4, c=1.05, rollback=None, resolution_guard=False)
    lr, ratio = [], []
    for _ in range(400):
        lr.append(float(opt.param_groups[0]["lr"]))
        opt.zero_grad()
        opt.step(lambda: 0.5 * kappa * (x.double() ** 2).sum())
        ratio.append(float(opt.last["ratio"]))
        with torch.no_grad():
            x.copy_(torch.ones(5))  # keep the loss far from 0, where the ratio stays readable
    run = {"label": "LOSSGRAD", "steps": {"lr": torch.tensor(lr), "ratio": torch.tensor(ratio)}}
    got = R.lossgrad_ratio_summary(run, window=100)
    assert got["curvature"] == pytest.approx(kappa, rel=1e-6)
    assert got["line_search_h"] == pytest.approx(1 / kappa, rel=1e-6)
    assert 1 / (1.05 * kappa) <= got["settled_h"] <= 1.05 / kappa
    assert 0.3 < got["shrink_share"] < 0.7 and got["ratio_one_share"] == 0.0
    with pytest.raises(ValueError, match="LOSSGRAD"):
        R.lossgrad_ratio_summary({"label": "SGD", "steps": {"lr": torch.ones(3), "ratio": torch.empty(0)}}, 1)
