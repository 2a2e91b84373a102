"""The paper's diagnostics (experiments.diagnostics): correlation and signal statistics with known
answers, per-layer hooks, and the last BN's recorded statistics."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import models
from experiments import diagnostics


def test_cosine_of_identical_samples_is_one_and_of_orthogonal_ones_zero():
    same = torch.randn(1, 3, 4, 4).repeat(5, 1, 1, 1)
    assert diagnostics.mean_cosine(same) == pytest.approx(1.0, abs=1e-12)
    orthogonal = torch.eye(6).reshape(6, 6, 1, 1) * torch.arange(1.0, 7.0).reshape(6, 1, 1, 1)
    assert diagnostics.mean_cosine(orthogonal) == pytest.approx(0.0, abs=1e-12)
    opposite = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    assert diagnostics.mean_cosine(opposite) == pytest.approx(-1.0)
    # three samples: pairs (a, b) = 1, (a, c) = (b, c) = 0 -> mean over 6 ordered pairs = 1/3
    mixed = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    assert diagnostics.mean_cosine(mixed) == pytest.approx(1 / 3)


def test_channel_stats_by_hand():
    # channel 0 holds 1, 3 (mean 2, var 1); channel 1 holds -1, -1 (mean -1, var 0)
    acts = torch.tensor([[[[1.0]], [[-1.0]]], [[[3.0]], [[-1.0]]]])
    mean_sq, var = diagnostics.channel_stats(acts)
    assert mean_sq == pytest.approx((4 + 1) / 2) and var == pytest.approx(0.5)
    assert diagnostics.channel_stats(torch.tensor([[2.0, 0.0], [4.0, 0.0]])) == (
        pytest.approx(4.5), pytest.approx(0.5))


def test_pre_activations_name_every_relu_input_in_order_then_the_logits():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 5), nn.ReLU(inplace=True), nn.Linear(5, 2))
    images = torch.randn(3, 3, 8, 8)
    layers = diagnostics.pre_activations(net, images)
    assert [name for name, _ in layers] == ["1", "4", "logits"]
    assert [tuple(t.shape) for _, t in layers] == [(3, 4, 6, 6), (3, 5), (3, 2)]
    assert (layers[0][1] < 0).any()  # the input of the in-place ReLU, not its output
    torch.testing.assert_close(layers[0][1], net[0](images))


def test_decorrelation_rows_per_form_and_bn_normalises_its_pre_activations():
    images = torch.randn(8, 3, 32, 32)
    table = diagnostics.decorrelation(["vgg11"], images, 10, seeds=[0], width=0.25)
    counts = table.groupby("form")["depth"].count()
    assert set(counts.index) == set(diagnostics.FORMS) and counts.nunique() == 1
    assert counts.iloc[0] == 8 + 2 + 1  # 8 conv ReLUs, 2 classifier ReLUs, the logits
    bn_convs = table[(table["form"] == "BN") & (table["depth"] <= 8)]
    assert bn_convs["channel_mean_sq"].max() < 1e-10  # BatchNorm2d in training mode
    assert bn_convs["channel_var"].between(0.99, 1.0).all()
    assert table[table["form"] == "MimicNorm"]["layer"].iloc[-1] == "logits"


def test_centred_forms_have_zero_mean_filters_at_initialisation():
    model = diagnostics.init_model("vgg11", "WeightMean only", 10, seed=0, width=0.25)
    centred = models.centred_conv_weights(model, models.CIFAR_RULE)
    assert centred and all(w.detach().mean(dim=(1, 2, 3)).abs().max() < 1e-6 for w in centred)
    plain = diagnostics.init_model("vgg11", "NoNorm", 10, seed=0, width=0.25)
    assert max(float(w.detach().mean(dim=(1, 2, 3)).abs().max())
               for w in models.centred_conv_weights(plain, models.CIFAR_RULE)) > 1e-4


def test_last_bn_dynamics_records_the_running_statistics_of_each_step():
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,),
                                                                         generator=gen))
               for _ in range(3)]
    table = diagnostics.last_bn_dynamics("vgg11", [0.01, 0.05], lambda epoch: batches, steps=4,
                                         warm_steps=2, num_classes=10, width=0.25)
    assert table.groupby("lr_peak")["step"].apply(list).to_dict() == {
        0.01: [1, 2, 3, 4], 0.05: [1, 2, 3, 4]}
    assert table["epoch"].tolist()[:4] == [1, 1, 1, 2]
    assert table[table["lr_peak"] == 0.05]["lr"].tolist() == pytest.approx([0.025, 0.05, 0.05,
                                                                             0.05])
    # step 1's running variance: 0.9 * 1 + 0.1 * the first batch's unbiased logit variance
    model = diagnostics.init_model("vgg11", "MimicNorm", 10, seed=0, width=0.25)
    logits = []
    diagnostics.last_bn_of(model).register_forward_pre_hook(
        lambda _m, inputs: logits.append(inputs[0].detach()))
    model(batches[0][0])
    expected = 0.9 + 0.1 * float(logits[0].var(dim=0, unbiased=True).mean())
    first = table.iloc[0]
    assert first["running_var"] == pytest.approx(expected, rel=1e-5)
    assert first["logits_std"] == pytest.approx(float(logits[0].std(dim=0).mean()), rel=1e-5)
    assert math.isfinite(table["loss"].iloc[-1])


def test_diagnostics_command_writes_its_files(tmp_path, one_thread):
    code = diagnostics.main(["--archs", "vgg11", "--samples", "8", "--seeds", "0",
                             "--lastbn-arch", "vgg11", "--lastbn-lrs", "0.1", "--epochs", "1",
                             "--warm", "1", "--batch-size", "8", "--out-dir", str(tmp_path)])
    assert code == 0
    for name in ("decorrelation.csv", "decorrelation.png", "lastbn.csv", "lastbn.png"):
        assert (tmp_path / name).stat().st_size > 0
