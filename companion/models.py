"""The networks of the LOSSGRAD paper (Wójcik, Maziarka, Tabor 2018, Table 7 and the
architectures it names), plus the WAE-MMD loss.

Every constructor draws its initial weights from torch's global generator only, so
``torch.manual_seed(s)`` before a constructor makes it deterministic.

Where each value comes from:

* "paper": the LOSSGRAD text (Table 7, appendix A); many of its numbers were lost in
  the extracted text (see shared/paper/PAPER_NOTES.md).
* "authors' example code": github.com/bartwojcik/lossgrad (mnist_example.py,
  autoencoder_fmnist_example.py), read for facts only.
* "He et al.": Deep Residual Learning for Image Recognition (CVPR 2016), Section 4.2.
* "WAE paper" / "WAE code": Tolstikhin et al., Wasserstein Auto-Encoders (ICLR 2018)
  and the official TensorFlow code github.com/tolstikhin/wae (models.py, ops.py,
  wae.py, configs.py), read for facts only.
* "assumption": chosen here because no source gives it; change it in one place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

__all__ = [
    "count_parameters",
    "mnist_mlp",
    "fmnist_autoencoder",
    "fmnist_cnn",
    "cifar_cnn",
    "resnet56",
    "BiLSTMClassifier",
    "WAEEncoder",
    "WAEDecoder",
    "WAE",
    "sample_prior",
    "mmd_penalty",
    "wae_loss",
]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (only those with requires_grad if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _init_normal_(model: nn.Module, std: float, bias: float) -> nn.Module:
    """Weights ~ N(0, std²) and biases = ``bias`` for every Linear/Conv/ConvTranspose layer."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.constant_(m.bias, bias)
    return model


# --------------------------------------------------------------------------------------
# MNIST, Fashion-MNIST, CIFAR-10 (paper Table 7)
# --------------------------------------------------------------------------------------

def mnist_mlp(init_std: float | None = 0.02, init_bias: float = 0.0) -> nn.Sequential:
    """MNIST classifier of Table 7: 784-500-300-100-10 with ReLUs, logits out.

    Input (N, 1, 28, 28) or (N, 784); output (N, 10) logits (use cross entropy).

    Init: weights N(0, 0.02²) and biases 0.0, as in the authors' example code
    (mnist_example.py sets both explicitly). Note that that example net is
    784-500-256-10, not Table 7's; the layer sizes here follow Table 7 (the paper).
    ``init_std=None`` keeps PyTorch's default init.
    """
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 500), nn.ReLU(),
        nn.Linear(500, 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )
    return model if init_std is None else _init_normal_(model, init_std, init_bias)


def fmnist_autoencoder(init_std: float | None = 0.05, init_bias: float = 0.2, width: float = 1.0) -> nn.Sequential:
    """Fashion-MNIST autoencoder of Table 7: 784-200-100-50-100-200-784, ReLUs, Sigmoid out.

    Input (N, 1, 28, 28) in [0, 1]; output the same shape in (0, 1) (train with MSE).
    Init: weights N(0, 0.05²), biases 0.2, as in the authors' example code
    (autoencoder_fmnist_example.py); ``init_std=None`` keeps PyTorch's default init. ``width`` scales the hidden
    widths (rounded; 0.5: 784-100-50-25-50-100-784, a held-out task of notebook 11).
    """
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a number > 0 (it scales the hidden widths 200, 100, 50), got {width!r}")
    a, b, code = (max(1, round(n * width)) for n in (200, 100, 50))
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, a), nn.ReLU(),
        nn.Linear(a, b), nn.ReLU(),
        nn.Linear(b, code), nn.ReLU(),
        nn.Linear(code, b), nn.ReLU(),
        nn.Linear(b, a), nn.ReLU(),
        nn.Linear(a, 28 * 28), nn.Sigmoid(),
        nn.Unflatten(1, (1, 28, 28)),
    )
    return model if init_std is None else _init_normal_(model, init_std, init_bias)


def fmnist_cnn(init_std: float | None = None, init_bias: float = 0.0) -> nn.Sequential:
    """A small CNN for 28x28 grey images (notebook 11's held-out task, ours, not the paper's): conv 5x5 1->8 (padding
    2), ReLU, max-pool 2, conv 5x5 8->16 (padding 2), ReLU, max-pool 2, linear 784->64, ReLU, linear 64->10 (logits).
    PyTorch's default initialisation unless ``init_std`` is given."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )
    return model if init_std is None else _init_normal_(model, init_std, init_bias)


def cifar_cnn(init_std: float | None = 0.05, init_bias: float = 0.0) -> nn.Sequential:
    """CIFAR-10 CNN of Table 7 (used for Figure 3 and the c sweep of Table 1).

    Conv5x5 3→30 (28x28), MaxPool 2 (14x14), ReLU, Conv5x5 30→40 (10x10), MaxPool 2
    (5x5), ReLU, Conv3x3 40→50 (3x3), ReLU, Linear 450→250, ReLU, 250→100, ReLU,
    100→10 logits. Input (N, 3, 32, 32); no padding (the sizes of Table 7 imply none).

    Init: the paper says "a normal distribution with a standard deviation [lost] and
    bias weights with a constant [lost]". ASSUMPTION: std 0.05, bias 0.0. Why 0.05:
    it is the authors' other std (their autoencoder) and is close to He scale
    sqrt(2/fan_in) for the middle layers of this net (fan_in 750 → 0.052, 1000 → 0.045,
    450 → 0.067), so activations neither explode nor vanish at the start; bias 0 as
    in their classifier example. ``init_std=None`` keeps PyTorch's default init.
    """
    model = nn.Sequential(
        nn.Conv2d(3, 30, kernel_size=5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(30, 40, kernel_size=5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(40, 50, kernel_size=3), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 50, 250), nn.ReLU(),
        nn.Linear(250, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )
    return model if init_std is None else _init_normal_(model, init_std, init_bias)


# --------------------------------------------------------------------------------------
# ResNet-56 (He et al. 2016, CIFAR variant)
# --------------------------------------------------------------------------------------

class _ZeroPadShortcut(nn.Module):
    """He et al.'s option A shortcut: subsample by 2 and zero-pad the new channels.

    Parameter-free, which is what makes ResNet-56 have 0.85M parameters.
    """

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.extra = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        # pad spec runs from the last dim backwards: (W, W, H, H, C_front, C_back)
        front = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, front, self.extra - front))


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU (He et al. Fig. 2 left)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = _ZeroPadShortcut(in_planes, planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 Section 4.2 with depth 6n+2.

    3x3 conv (16) + BN + ReLU, then three stages of n basic blocks with 16, 32, 64
    filters on 32x32, 16x16, 8x8 maps (the first block of stages 2 and 3 strides by
    2), option-A (zero-padding identity) shortcuts, global average pooling, a fully
    connected layer to the logits. Init: Kaiming normal (He et al. 2015, fan_in, ReLU
    gain) for conv and linear weights, as He et al. 2016 state; BN weight 1, bias 0;
    linear bias 0.
    """

    def __init__(self, n: int = 9, num_classes: int = 10):
        super().__init__()
        if n < 1:
            raise ValueError(f"CifarResNet needs n >= 1 blocks per stage, got n={n}")
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR-10 (n = 9): 0.85M parameters as in He et al. Table 6."""
    return CifarResNet(n=9, num_classes=num_classes)


# --------------------------------------------------------------------------------------
# IMDb BiLSTM (paper appendix A)
# --------------------------------------------------------------------------------------

class BiLSTMClassifier(nn.Module):
    """Sentiment classifier of the paper's IMDb experiment.

    Frozen pretrained embeddings (GloVe 6B 100-d in the paper; row 0 is padding), one
    bidirectional LSTM layer with ``hidden`` (256) units per direction, the final
    hidden states of both directions concatenated, a linear layer to one logit
    (train with ``BCEWithLogitsLoss``).

    forward(tokens (N, T) int64, lengths (N,) int64) -> logits (N,). Sequences are
    packed (``pack_padded_sequence``, enforce_sorted=False), so the LSTM never sees
    the padding: extra zero columns do not change the output.
    """

    def __init__(self, embeddings: torch.Tensor, hidden: int = 256, freeze: bool = True):
        super().__init__()
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        if embeddings.dim() != 2:
            raise ValueError("BiLSTMClassifier needs an embedding matrix of shape (vocab, dim), "
                             f"got shape {tuple(embeddings.shape)}")
        self.embedding = nn.Embedding.from_pretrained(embeddings, freeze=freeze, padding_idx=0)
        self.lstm = nn.LSTM(embeddings.shape[1], hidden, num_layers=1,
                            batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, 1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (N, T) int64, got shape {tuple(tokens.shape)}")
        lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()  # pack needs CPU lengths
        if lengths.shape != (tokens.shape[0],):
            raise ValueError(f"lengths must have shape ({tokens.shape[0]},), got {tuple(lengths.shape)}")
        if (lengths < 1).any() or (lengths > tokens.shape[1]).any():
            raise ValueError(f"every length must lie in [1, {tokens.shape[1]}] (the padded width); "
                             f"got min {int(lengths.min())}, max {int(lengths.max())}")
        packed = pack_padded_sequence(self.embedding(tokens), lengths,
                                      batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # h_n: (2, N, hidden), back in input order
        return self.fc(torch.cat([h_n[0], h_n[1]], dim=1)).squeeze(1)


# --------------------------------------------------------------------------------------
# WAE-MMD for 64x64 CelebA (Tolstikhin et al. 2018)
# --------------------------------------------------------------------------------------
# Sources, checked against the official code (tolstikhin/wae):
# * configs.py, config_celebA: zdim 64, conv_filters_dim 5, e_num_filters 1024 with
#   e_num_layers 4, g_num_filters 1024 with g_num_layers 4, e_arch 'dcgan', g_arch
#   'dcgan_mod', batch_norm True (eps 1e-5, decay 0.9 = PyTorch momentum 0.1),
#   init_std 0.0099999, init_bias 0.0, mmd_kernel 'IMQ', pz 'normal', pz_scale 1.
# * models.py dcgan_encoder: 4 convs with 1024/2^(3-i) = 128, 256, 512, 1024 filters,
#   each conv -> BN -> ReLU, then a linear layer to zdim.
# * models.py dcgan_decoder ('dcgan_mod'): linear to 8x8x1024 (64 / 2^(4-1) = 8), ReLU
#   (no BN), then 3 transposed convs with 512, 256, 128 filters, each -> BN -> ReLU,
#   then a final transposed conv with stride 1 to 3 channels.
# * ops.py: conv2d / deconv2d default stride 2, padding 'SAME'.
# * The WAE paper's own appendix text could not be read in the stored copies available
#   here; the layers above match the commonly quoted description of it (encoder
#   Conv128-256-512-1024 + BN + ReLU, FC 64; decoder FC 8x8x1024, FConv 512-256-128
#   + BN + ReLU, FConv 3).

_WAE_CHANNELS = (128, 256, 512, 1024)


class WAEEncoder(nn.Module):
    """Deterministic WAE encoder for (N, 3, 64, 64) images → (N, latent) codes.

    Four 5x5 stride-2 convs (128, 256, 512, 1024 filters; 64→32→16→8→4), each followed
    by BN and ReLU, then a linear layer from 4·4·1024 to ``latent``. padding=2 gives
    TensorFlow's 'SAME' output sizes for stride 2.

    Not reproduced: the official code can add N(0, 0.01²) noise to the inputs in
    training (its 'add_noise' encoder option); the WAE paper's encoders are
    deterministic, and so is this one.
    """

    def __init__(self, latent: int = 64, init_std: float | None = 0.01):
        super().__init__()
        layers, c_in = [], 3
        for c_out in _WAE_CHANNELS:
            layers += [nn.Conv2d(c_in, c_out, 5, stride=2, padding=2),
                       nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Linear(4 * 4 * _WAE_CHANNELS[-1], latent)
        if init_std is not None:  # official config: N(0, 0.01²) weights, zero biases
            _init_normal_(self, init_std, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (3, 64, 64):
            raise ValueError(f"WAEEncoder expects (N, 3, 64, 64) images, got {tuple(x.shape)}")
        return self.fc(self.features(x))


class WAEDecoder(nn.Module):
    """WAE decoder (N, latent) → (N, 3, 64, 64).

    Linear to 8·8·1024, ReLU, then three 5x5 stride-2 transposed convs (512, 256, 128
    filters; 8→16→32→64) each followed by BN and ReLU, then a 5x5 stride-1 transposed
    conv to 3 channels. padding=2, output_padding=1 gives TensorFlow's 'SAME' sizes.

    Output activation: the official CelebA run scales images to [-1, 1]
    (input_normalize_sym True) and ends with tanh; our CelebA tensors are in [0, 1],
    so the default here is ``out_activation='sigmoid'`` (the official code's choice for
    [0, 1] data). 'tanh' and 'none' (raw outputs) are also available.
    """

    def __init__(self, latent: int = 64, init_std: float | None = 0.01,
                 out_activation: str = "sigmoid"):
        super().__init__()
        acts = {"sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "none": nn.Identity()}
        if out_activation not in acts:
            raise ValueError(f"out_activation must be one of {sorted(acts)}, got {out_activation!r}")
        self.fc = nn.Linear(latent, 8 * 8 * _WAE_CHANNELS[-1])
        layers, c_in = [nn.ReLU(), nn.Unflatten(1, (_WAE_CHANNELS[-1], 8, 8))], _WAE_CHANNELS[-1]
        for c_out in reversed(_WAE_CHANNELS[:-1]):  # 512, 256, 128
            layers += [nn.ConvTranspose2d(c_in, c_out, 5, stride=2, padding=2, output_padding=1),
                       nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        layers += [nn.ConvTranspose2d(c_in, 3, 5, stride=1, padding=2), acts[out_activation]]
        self.net = nn.Sequential(*layers)
        if init_std is not None:
            _init_normal_(self, init_std, 0.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z))


class WAE(nn.Module):
    """Encoder + decoder. forward(x) -> (reconstruction, z)."""

    def __init__(self, latent: int = 64, init_std: float | None = 0.01,
                 out_activation: str = "sigmoid"):
        super().__init__()
        self.latent = latent
        self.encoder = WAEEncoder(latent, init_std)
        self.decoder = WAEDecoder(latent, init_std, out_activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return self.decoder(z), z


def sample_prior(n: int, latent: int = 64, prior_var: float = 1.0,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """n samples of the Gaussian prior N(0, prior_var·I) in R^latent.

    Draw once per batch and pass the same sample to every loss evaluation of that
    batch (a LOSSGRAD probe re-evaluates the loss; a fresh prior sample would add
    noise to its ratio).
    """
    return math.sqrt(prior_var) * torch.randn(n, latent, generator=generator, device=device)


def mmd_penalty(z: torch.Tensor, z_prior: torch.Tensor, prior_var: float = 1.0,
                scales: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)) -> torch.Tensor:
    """Unbiased MMD² estimate between codes ``z`` (n, d) and prior samples (m, d).

    Kernel: inverse multiquadratic k(x, y) = C / (C + ||x − y||²), summed over
    C = s · 2·d·prior_var for s in ``scales``, exactly as the official WAE code
    (wae.py, mmd_penalty, kernel 'IMQ'; the scale list and Cbase = 2·zdim·σ² are
    from there). Within-sample sums exclude the diagonal (divided by n(n−1) and
    m(m−1)); the cross term averages over all n·m pairs, times 2.
    ``prior_var`` must be the variance used to draw ``z_prior``.
    """
    if z.dim() != 2 or z_prior.dim() != 2 or z.shape[1] != z_prior.shape[1]:
        raise ValueError("mmd_penalty needs two (n, d) and (m, d) tensors with the same d, got "
                         f"{tuple(z.shape)} and {tuple(z_prior.shape)}")
    n, m, d = z.shape[0], z_prior.shape[0], z.shape[1]
    if n < 2 or m < 2:
        raise ValueError(f"mmd_penalty needs at least 2 samples on each side, got n={n}, m={m}")
    z_prior = z_prior.to(z.dtype)
    d_qq = torch.cdist(z, z).pow(2)
    d_pp = torch.cdist(z_prior, z_prior).pow(2)
    d_qp = torch.cdist(z, z_prior).pow(2)
    off_q = 1.0 - torch.eye(n, dtype=z.dtype, device=z.device)
    off_p = 1.0 - torch.eye(m, dtype=z.dtype, device=z.device)
    c_base = 2.0 * d * prior_var
    stat = z.new_zeros(())
    for s in scales:
        c = c_base * s
        stat = stat + ((c / (c + d_qq)) * off_q).sum() / (n * (n - 1))
        stat = stat + ((c / (c + d_pp)) * off_p).sum() / (m * (m - 1))
        stat = stat - 2.0 * (c / (c + d_qp)).sum() / (n * m)
    return stat


def wae_loss(x: torch.Tensor, recon: torch.Tensor, z: torch.Tensor, lam: float = 100.0,
             z_prior: torch.Tensor | None = None, prior_var: float = 1.0,
             reduction: str = "sum") -> torch.Tensor:
    """WAE-MMD objective: reconstruction cost + lam · mmd_penalty(z, z_prior).

    Reconstruction, c(x, y) = ||x − y||² (the WAE paper's squared cost):
    * ``reduction='sum'`` (default): squared error summed over each image's pixels,
      averaged over the batch. This is the WAE paper's cost and what the common PyTorch
      re-implementation (1Konny/WAE-pytorch) trains; the LOSSGRAD paper only says "MSE",
      so which scaling its authors used is unknown (ASSUMPTION). To report a per-pixel
      MSE, divide the reconstruction term by x[0].numel().
    * ``reduction='mean'``: per-element MSE (F.mse_loss); with lam = 100 the MMD
      term then dominates, so pick lam accordingly.
    The official TF code multiplies the 'sum' cost by 0.05; not done here.

    lam = 100: the value usually quoted for WAE-MMD on CelebA from the WAE paper; it is
    what 1Konny/WAE-pytorch's CelebA script uses (reg_weight 100, together with prior
    variance z_var 2, Adam lr 1e-3, beta1 0.5), while the official repo's configs.py
    has lambda 10 and pz_scale 1. The paper's text itself was not readable here.
    Default prior variance here is 1 (official code); pass 2 to follow the script.

    ``z_prior``: pass the batch's prior sample (see ``sample_prior``); if None, a
    fresh one is drawn (non-deterministic between calls).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if x.shape != recon.shape:
        raise ValueError(f"x and recon shapes differ: {tuple(x.shape)} vs {tuple(recon.shape)}")
    if reduction == "sum":
        rec = (recon - x).pow(2).flatten(1).sum(1).mean()
    else:
        rec = F.mse_loss(recon, x)
    if z_prior is None:
        z_prior = sample_prior(z.shape[0], z.shape[1], prior_var, device=z.device).to(z.dtype)
    return rec + lam * mmd_penalty(z, z_prior, prior_var)


# --------------------------------------------------------------------------------------
# WAE-MMD as a task of companion.train, a small stand-in network for smoke runs, and the
# optimizer of the WAE paper (the "original" row of the LOSSGRAD paper's WAE table)
# --------------------------------------------------------------------------------------

def _unit_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (0..255) -> float32 in [0, 1]; floating images are taken as already in [0, 1]."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if x.is_floating_point():
        return x
    raise TypeError(f"WAE images must be uint8 (0..255) or floating point in [0, 1], got {x.dtype}")


class WAEMMDTask:
    """The WAE-MMD objective (:func:`wae_loss`) as a task of ``companion.train``.

    A batch is ``(images, z_prior)``: images uint8 (N, 3, H, W) in 0..255 (CelebA's storage; converted
    per batch, on the batch's device) or float in [0, 1], and one prior sample per image. The prior
    sample travels WITH the batch so that every evaluation of the loss on one batch sees the same
    sample: LOSSGRAD's probe re-evaluates the loss after its step, and a fresh prior sample there
    would add the MMD estimator's noise to the ratio it decides by.

    * Training: ``Experiment(..., augment=task.attach_prior)`` gives every training batch a fresh
      prior sample, drawn from the run's data generator: seeded, restored on resume, and the same
      for every optimizer run with the same seed.
    * Evaluation: ``task.with_prior(split, seed)`` attaches one fixed prior sample to a whole split,
      so every epoch of every run is measured against the same sample.

    ``evaluate`` returns sums over the batch (``companion.train.evaluate`` divides by the split
    size): ``loss`` the objective, ``recon`` its reconstruction term (per image: the summed squared
    error for ``reduction='sum'``, the per-pixel MSE for ``'mean'``), ``mse`` the per-pixel MSE, and
    ``mmd`` the batch's MMD² estimate weighted by the batch size. The MMD estimate is unbiased
    whatever the batch size, so evaluation batches larger than training batches measure the same
    quantity; a batch of one image has no estimate and counts as 0 (the evaluation batch size
    should not leave one image over).

    Defaults: ``lam`` = 100 and ``prior_var`` = 2 follow the WAE-MMD CelebA setting as quoted from
    the WAE paper and used by the common PyTorch re-implementation (see :func:`wae_loss`; the
    official configs.py has lambda 10, pz_scale 1); ``latent`` 64; ``reduction`` see :func:`wae_loss`.
    """

    metrics = ("loss", "recon", "mse", "mmd")

    def __init__(self, lam: float = 100.0, prior_var: float = 2.0, latent: int = 64, reduction: str = "sum"):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if not (lam >= 0 and prior_var > 0 and latent >= 1):
            raise ValueError(f"need lam >= 0, prior_var > 0, latent >= 1; got {lam}, {prior_var}, {latent}")
        self.lam, self.prior_var, self.latent, self.reduction = float(lam), float(prior_var), int(latent), reduction

    # ------------------------------------------------------------- prior samples
    def attach_prior(self, batch: tuple, generator: torch.Generator) -> tuple:
        """Training hook (``augment=``): ``(images, fresh prior sample)``; any sample already there is replaced."""
        images = batch[0]
        z = sample_prior(len(images), self.latent, self.prior_var, generator=generator)
        return images, z.to(images.device)

    def with_prior(self, split, seed: int = 0) -> tuple:
        """``(images, z_prior)`` for a whole split, with a fixed prior sample drawn from ``seed``.

        ``split``: the images (N, 3, H, W), as ``companion.data.celeba`` returns them, or a tuple
        whose first tensor holds them."""
        images = split if isinstance(split, torch.Tensor) else split[0]
        z = sample_prior(len(images), self.latent, self.prior_var, generator=torch.Generator().manual_seed(seed))
        return images, z

    def _unpack(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        if len(batch) != 2:
            raise ValueError(
                f"a WAE-MMD batch is (images, z_prior), got {len(batch)} tensor(s): train with "
                "Experiment(..., augment=task.attach_prior) and evaluate on task.with_prior(split)")
        x, z_prior = batch
        if z_prior.dim() != 2 or z_prior.shape != (len(x), self.latent):
            raise ValueError(f"z_prior must have shape ({len(x)}, {self.latent}), got {tuple(z_prior.shape)}")
        return _unit_images(x), z_prior

    # ------------------------------------------------------------- task interface
    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        """The WAE-MMD objective on the batch (what the optimizers minimise)."""
        x, z_prior = self._unpack(batch)
        recon, z = model(x)
        return wae_loss(x, recon, z, lam=self.lam, z_prior=z_prior, prior_var=self.prior_var,
                        reduction=self.reduction)

    def evaluate(self, model: nn.Module, batch: tuple) -> dict:
        """Sums over the batch of the objective and its parts (see the class docstring)."""
        x, z_prior = self._unpack(batch)
        recon, z = model(x)
        sq = (recon - x).pow(2).flatten(1)
        mse = sq.mean(1)
        rec = sq.sum(1) if self.reduction == "sum" else mse
        n = len(x)
        mmd = mmd_penalty(z, z_prior, self.prior_var) * n if n >= 2 else z.new_zeros(())
        return {"loss": rec.sum() + self.lam * mmd, "recon": rec.sum(), "mse": mse.sum(), "mmd": mmd}

    # ------------------------------------------------------------- pictures
    @torch.no_grad()
    def reconstruct(self, model: nn.Module, images: torch.Tensor, device) -> torch.Tensor:
        """Reconstructions of ``images`` in eval mode, float in [0, 1] on the CPU (for image grids)."""
        was_training = model.training
        model.eval()
        recon, _ = model(_unit_images(images.to(device)))
        model.train(was_training)
        return recon.float().cpu()

    @torch.no_grad()
    def generate(self, model: nn.Module, n: int, device, seed: int = 0) -> torch.Tensor:
        """``n`` random images: the decoder of ``model`` at prior samples drawn from ``seed`` (eval mode, CPU)."""
        z = sample_prior(n, self.latent, self.prior_var, generator=torch.Generator().manual_seed(seed))
        was_training = model.training
        model.eval()
        out = model.decoder(z.to(device))
        model.train(was_training)
        return out.float().cpu()


class SmallWAE(nn.Module):
    """A small stand-in for :class:`WAE` in smoke runs: NOT the paper's network.

    The same layout at 1/16 of the width by default (``width`` 8: 5x5 stride-2 convs with 8, 16,
    32, 64 filters, each with BN and ReLU, a linear layer to ``latent``; the decoder mirrors it),
    the same interface (``forward(x) -> (reconstruction, z)``, ``.encoder``, ``.decoder``,
    ``.latent``), so a notebook's smoke run exercises the same code in seconds on a CPU.
    """

    def __init__(self, latent: int = 8, width: int = 8):
        super().__init__()
        self.latent = latent
        chans = [width * 2 ** i for i in range(4)]
        enc, c_in = [], 3
        for c_out in chans:
            enc += [nn.Conv2d(c_in, c_out, 5, stride=2, padding=2), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(4 * 4 * chans[-1], latent))
        dec = [nn.Linear(latent, 8 * 8 * chans[-1]), nn.ReLU(), nn.Unflatten(1, (chans[-1], 8, 8))]
        c_in = chans[-1]
        for c_out in reversed(chans[:-1]):
            dec += [nn.ConvTranspose2d(c_in, c_out, 5, stride=2, padding=2, output_padding=1),
                    nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        dec += [nn.ConvTranspose2d(c_in, 3, 5, stride=1, padding=2), nn.Sigmoid()]
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return self.decoder(z), z


__all__ += ["WAEMMDTask", "SmallWAE"]
