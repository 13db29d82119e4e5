"""Tests for companion/models.py: shapes, sizes, init, padding invariance, MMD."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from companion import models as M


def _linear_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _output_shapes(model, x, layer_type):
    shapes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
             for m in model.modules() if isinstance(m, layer_type)]
    model(x)
    for h in hooks:
        h.remove()
    return shapes


# ----------------------------------------------------------------------------- Table 7

def test_mnist_mlp_shapes_and_layers():
    model = M.mnist_mlp()
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    assert model(torch.rand(5, 784)).shape == (5, 10)
    sizes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert sizes == [(784, 500), (500, 300), (300, 100), (100, 10)]


def test_mnist_mlp_init_statistics():
    torch.manual_seed(0)
    model = M.mnist_mlp()
    w = torch.cat([p.flatten() for p in _linear_weights(model)])
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(0.02, rel=0.02)
    biases = torch.cat([m.bias for m in model.modules() if isinstance(m, nn.Linear)])
    assert torch.all(biases == 0)


def test_init_std_none_keeps_pytorch_default():
    torch.manual_seed(0)
    first = M.mnist_mlp(init_std=None)[1]
    bound = 1 / math.sqrt(784)  # PyTorch's default Linear init is U(-1/sqrt(fan_in), ...)
    assert first.weight.abs().max().item() <= bound
    assert first.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_fmnist_autoencoder_shapes_and_init():
    torch.manual_seed(0)
    model = M.fmnist_autoencoder()
    out = model(torch.rand(4, 1, 28, 28))
    assert out.shape == (4, 1, 28, 28)
    assert torch.all((out > 0) & (out < 1))
    sizes = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    assert sizes == [200, 100, 50, 100, 200, 784]
    w = torch.cat([p.flatten() for p in _linear_weights(model)])
    assert w.std().item() == pytest.approx(0.05, rel=0.02)
    biases = torch.cat([m.bias for m in model.modules() if isinstance(m, nn.Linear)])
    assert torch.allclose(biases, torch.full_like(biases, 0.2))


def test_cifar_cnn_sizes_follow_table7():
    torch.manual_seed(0)
    model = M.cifar_cnn()
    x = torch.rand(3, 3, 32, 32)
    assert model(x).shape == (3, 10)
    assert _output_shapes(model, x, nn.Conv2d) == [(30, 28, 28), (40, 10, 10), (50, 3, 3)]
    assert _output_shapes(model, x, nn.MaxPool2d) == [(30, 14, 14), (40, 5, 5)]
    assert _output_shapes(model, x, nn.Linear) == [(250,), (100,), (10,)]


def test_cifar_cnn_init_options():
    torch.manual_seed(0)
    model = M.cifar_cnn(init_std=0.05, init_bias=0.1)
    w = torch.cat([p.flatten() for p in _linear_weights(model)])
    assert w.std().item() == pytest.approx(0.05, rel=0.02)
    biases = torch.cat([m.bias for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))])
    assert torch.allclose(biases, torch.full_like(biases, 0.1))
    # the default init keeps the logits' scale away from vanishing (see docstring)
    torch.manual_seed(0)
    logits = M.cifar_cnn()(torch.rand(64, 3, 32, 32))
    assert logits.std().item() > 1e-3


@pytest.mark.parametrize("ctor", [M.mnist_mlp, M.fmnist_autoencoder, M.cifar_cnn, M.resnet56])
def test_constructors_are_deterministic_under_seed(ctor):
    def build(seed):
        torch.manual_seed(seed)
        return ctor().state_dict()
    a, b, c = build(1), build(1), build(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


# ----------------------------------------------------------------------------- ResNet-56

def test_resnet56_parameter_count_matches_he_et_al():
    n = M.count_parameters(M.resnet56())
    assert 0.84e6 <= n <= 0.86e6  # He et al. 2016, Table 6: 0.85M


def test_resnet56_depth_and_output():
    torch.manual_seed(0)
    model = M.resnet56()
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 56  # 1 + 3·9·2 convs + 1 fc
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert M.resnet56(num_classes=100)(x).shape == (2, 100)
    # the stages run at 32x32 (16 ch), 16x16 (32 ch), 8x8 (64 ch)
    shapes = set(_output_shapes(model, x, nn.BatchNorm2d))
    assert shapes == {(16, 32, 32), (32, 16, 16), (64, 8, 8)}


# ----------------------------------------------------------------------------- BiLSTM

@pytest.fixture(scope="module")
def bilstm():
    torch.manual_seed(0)
    return M.BiLSTMClassifier(torch.randn(40, 100)).eval()


def _random_batch(gen, n=5, vocab=40):
    lengths = torch.randint(1, 9, (n,), generator=gen)
    lengths[0] = 8
    tokens = torch.zeros(n, 8, dtype=torch.int64)
    for i, length in enumerate(lengths):
        tokens[i, :length] = torch.randint(1, vocab, (int(length),), generator=gen)
    return tokens, lengths


def test_bilstm_shapes_and_frozen_embeddings(bilstm):
    tokens, lengths = _random_batch(torch.Generator().manual_seed(1))
    assert bilstm(tokens, lengths).shape == (5,)
    assert not bilstm.embedding.weight.requires_grad
    assert bilstm.lstm.hidden_size == 256 and bilstm.lstm.bidirectional
    assert bilstm.lstm.num_layers == 1 and bilstm.fc.in_features == 512
    trainable = M.BiLSTMClassifier(torch.randn(40, 100), freeze=False)
    assert trainable.embedding.weight.requires_grad


def test_bilstm_padding_does_not_change_logits(bilstm):
    tokens, lengths = _random_batch(torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = bilstm(tokens, lengths)
        padded = bilstm(F.pad(tokens, (0, 7)), lengths)  # 7 extra zero columns
        garbage = tokens.clone()
        for i, length in enumerate(lengths):  # tokens past each length are ignored
            garbage[i, length:] = 3
        past_end = bilstm(garbage, lengths)
        alone = torch.stack([bilstm(tokens[i:i + 1, :lengths[i]], lengths[i:i + 1])[0]
                             for i in range(len(lengths))])
    torch.testing.assert_close(padded, base, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(past_end, base, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(alone, base, atol=1e-6, rtol=1e-5)


def test_bilstm_rejects_bad_lengths(bilstm):
    tokens, lengths = _random_batch(torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="length"):
        bilstm(tokens, torch.zeros_like(lengths))
    with pytest.raises(ValueError, match="length"):
        bilstm(tokens, lengths[:-1])


# ----------------------------------------------------------------------------- WAE

@pytest.fixture(scope="module")
def wae():
    torch.manual_seed(0)
    return M.WAE(latent=64)


def test_wae_shapes(wae):
    x = torch.rand(2, 3, 64, 64)
    recon, z = wae(x)
    assert z.shape == (2, 64) and recon.shape == (2, 3, 64, 64)
    assert torch.all((recon >= 0) & (recon <= 1))
    assert wae.encoder(x).shape == (2, 64)
    assert wae.decoder(torch.randn(3, 64)).shape == (3, 3, 64, 64)
    with pytest.raises(ValueError, match="64, 64"):
        wae.encoder(torch.rand(2, 3, 32, 32))


def test_wae_layers_follow_the_wae_celeba_architecture(wae):
    convs = [m for m in wae.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 256, 512, 1024]
    assert all(c.kernel_size == (5, 5) and c.stride == (2, 2) for c in convs)
    deconvs = [m for m in wae.decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [d.out_channels for d in deconvs] == [512, 256, 128, 3]
    assert [d.stride for d in deconvs] == [(2, 2)] * 3 + [(1, 1)]
    assert wae.decoder.fc.out_features == 8 * 8 * 1024
    x = torch.rand(2, 3, 64, 64)
    assert _output_shapes(wae.encoder, x, nn.Conv2d) == [(128, 32, 32), (256, 16, 16),
                                                          (512, 8, 8), (1024, 4, 4)]


def _mmd_reference(x, y, prior_var, scales=(0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)):
    """Slow, loop-by-loop unbiased MMD² with the summed IMQ kernel."""
    x, y = x.double().tolist(), y.double().tolist()
    d = len(x[0])

    def k(a, b, c):
        return c / (c + sum((ai - bi) ** 2 for ai, bi in zip(a, b)))

    total = 0.0
    for s in scales:
        c = 2 * d * prior_var * s
        n, m = len(x), len(y)
        kxx = sum(k(x[i], x[j], c) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        kyy = sum(k(y[i], y[j], c) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        kxy = sum(k(a, b, c) for a in x for b in y) / (n * m)
        total += kxx + kyy - 2 * kxy
    return total


def test_mmd_matches_reference_formula():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = 1.5 * torch.randn(5, 3, generator=gen, dtype=torch.float64) + 0.3
    for prior_var in (1.0, 2.0):
        got = M.mmd_penalty(x, y, prior_var=prior_var).item()
        assert got == pytest.approx(_mmd_reference(x, y, prior_var), rel=1e-10)


def test_mmd_small_for_same_distribution_large_for_shifted():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 500, 64, generator=gen)
    same = M.mmd_penalty(a, b).item()
    shifted = M.mmd_penalty(a + 0.5, b).item()
    assert shifted > 0.05
    assert abs(same) < 0.02 * shifted


def test_mmd_estimate_is_unbiased():
    # Averaged over many same-distribution pairs, the unbiased estimate is ~0;
    # a biased one (diagonal included) would sit clearly above 0.
    gen = torch.Generator().manual_seed(0)
    vals = torch.tensor([M.mmd_penalty(*torch.randn(2, 20, 4, generator=gen, dtype=torch.float64)).item()
                         for _ in range(300)])
    se = vals.std() / math.sqrt(len(vals))
    assert abs(vals.mean().item()) < 3 * se.item()


def test_mmd_is_differentiable_and_checks_shapes():
    z = torch.randn(10, 4, requires_grad=True)
    M.mmd_penalty(z + 1.0, torch.randn(10, 4)).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        M.mmd_penalty(torch.randn(10, 4), torch.randn(10, 5))


def test_wae_loss_combines_reconstruction_and_mmd():
    gen = torch.Generator().manual_seed(0)
    x, recon = torch.rand(2, 4, 3, 8, 8, generator=gen)
    z = torch.randn(4, 6, generator=gen)
    zp = torch.randn(4, 6, generator=gen)
    mmd = M.mmd_penalty(z, zp).item()
    sum_sq = sum(((recon[i] - x[i]) ** 2).sum().item() for i in range(4)) / 4
    assert M.wae_loss(x, recon, z, lam=100.0, z_prior=zp).item() == pytest.approx(sum_sq + 100 * mmd, rel=1e-5)
    per_pixel = ((recon - x) ** 2).mean().item()
    got = M.wae_loss(x, recon, z, lam=3.0, z_prior=zp, reduction="mean").item()
    assert got == pytest.approx(per_pixel + 3 * mmd, rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        M.wae_loss(x, recon, z, z_prior=zp, reduction="max")


def test_sample_prior_variance():
    s = M.sample_prior(20000, latent=8, prior_var=2.0, generator=torch.Generator().manual_seed(0))
    assert s.shape == (20000, 8)
    assert s.var().item() == pytest.approx(2.0, rel=0.03)


def test_fmnist_cnn_maps_images_to_ten_logits_with_pytorchs_init():
    torch.manual_seed(0)
    model = M.fmnist_cnn()
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 8, (5, 5)), (8, 16, (5, 5))]
    torch.manual_seed(0)
    reference = nn.Conv2d(1, 8, 5, padding=2)  # PyTorch's default init, drawn first
    assert torch.equal(convs[0].weight, reference.weight)


def test_autoencoder_width_scales_the_hidden_layers_and_defaults_to_table_7():
    widths = lambda m: [l.out_features for l in m.modules() if isinstance(l, nn.Linear)]  # noqa: E731
    assert widths(M.fmnist_autoencoder()) == [200, 100, 50, 100, 200, 784]
    assert widths(M.fmnist_autoencoder(width=0.5)) == [100, 50, 25, 50, 100, 784]
    torch.manual_seed(0)
    a = M.fmnist_autoencoder()
    torch.manual_seed(0)
    b = M.fmnist_autoencoder(width=1.0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="width must be a number > 0"):
        M.fmnist_autoencoder(width=0)
