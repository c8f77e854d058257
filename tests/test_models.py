"""The MLPs and the max-norm constraint."""
import pytest
import torch

from kd_cli.models import MLP, Dropout, apply_max_norm_, build_mlp


def test_shapes_and_arch_round_trip():
    m = MLP(hidden=[1200, 1200], dropout_input=0.2, dropout_hidden=0.5)
    assert m(torch.rand(5, 28, 28)).shape == (5, 10)
    assert [l.out_features for l in m.hidden] == [1200, 1200]
    clone = build_mlp(m.arch)
    clone.load_state_dict(m.state_dict())
    m.eval(), clone.eval()
    x = torch.rand(3, 784)
    assert torch.equal(m(x), clone(x))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = MLP(hidden=[50], dropout_input=0.5, dropout_hidden=0.5)
    x = torch.rand(4, 784)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_input_dropout_reaches_the_first_layer(p):
    """In training the first layer sees the inputs with a share p zeroed (the teacher's 20%) and
    the rest scaled by about 1 / (1 - p): input dropout, not only hidden dropout."""
    torch.manual_seed(0)
    m, seen = MLP(hidden=[8], dropout_input=p, dropout_hidden=0.0).train(), []
    m.hidden[0].register_forward_pre_hook(lambda layer, args: seen.append(args[0]))
    m(torch.ones(200, 784))
    kept = seen[0] != 0
    assert abs((1 - kept.float().mean().item()) - p) < 1 / 256 + 0.01  # p itself, to the byte masks' 1/256
    assert torch.allclose(seen[0][kept], torch.tensor(1 / (1 - p)), rtol=0.01)


def test_max_norm_holds_after_a_large_step():
    torch.manual_seed(1)
    m = MLP(hidden=[64, 64])
    opt = torch.optim.SGD(m.parameters(), lr=50.0)
    loss = m(torch.rand(32, 784) * 10).pow(2).sum()
    loss.backward()
    opt.step()
    c = 1.5
    assert max(l.weight.norm(dim=1).max() for l in m.hidden) > c  # the step broke the limit...
    out_before = m.out.weight.clone()
    apply_max_norm_(m, c)
    for layer in m.hidden:  # ...and the constraint restores it for every hidden unit
        assert layer.weight.norm(dim=1).max() <= c * (1 + 1e-5)
    assert torch.equal(m.out.weight, out_before)  # the output layer is not constrained


def test_max_norm_scales_only_the_units_over_the_limit_onto_it():
    """Rows written by hand: a unit of norm 5 comes back as itself times 1.5 / 5; a unit of norm
    0.5 and a dead unit stay bit for bit (a cap, not a projection onto the sphere), biases too."""
    m = MLP(hidden=[3])
    with torch.no_grad():
        m.hidden[0].weight.zero_()
        m.hidden[0].weight[0, :2] = torch.tensor([3.0, 4.0])
        m.hidden[0].weight[1, :2] = torch.tensor([0.3, 0.4])
    rows, bias = m.hidden[0].weight.clone(), m.hidden[0].bias.clone()
    apply_max_norm_(m, 1.5)
    w = m.hidden[0].weight
    torch.testing.assert_close(w[0, :2], torch.tensor([0.9, 1.2]))
    assert torch.equal(w[0, 2:], rows[0, 2:]) and torch.equal(w[1:], rows[1:])
    assert torch.equal(m.hidden[0].bias, bias)


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])  # on CUDA the layer hands over to torch's dropout
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_rate_scale_and_gradient(p, device):
    torch.manual_seed(2)
    drop = Dropout(p).train()
    x = torch.ones(2000, 2000, requires_grad=True, device=device)
    y = drop(x)
    # the kept share is kept/256 on CPU (p rounded to 1/256), 1 - p on CUDA; 4M units put one
    # byte value more or less (1/256 = 0.0039) at about 15 standard errors from it
    kept_share = drop.kept / 256 if device == "cpu" else 1 - p
    assert abs((y != 0).float().mean().item() - kept_share) < 0.001
    assert abs((y == 0).float().mean().item() - p) < 1 / 256 + 0.001  # the rate asked for, to a byte's 1/256
    assert Dropout(0.2).kept == 205 and Dropout(0.5).kept == 128  # 256 * 0.8 = 204.8 and 256 * 0.5, rounded
    assert not torch.equal(y[0] != 0, y[1] != 0)  # each row draws its own mask
    kept = y[y != 0]
    # inverted-dropout scale: 256/kept for kd's byte masks, torch's exact 1 / (1 - p) on CUDA
    scale = 256 / drop.kept if device == "cpu" else 1 / (1 - p)
    assert torch.allclose(kept, torch.full_like(kept, scale))
    assert abs(y.mean().item() - 1) < 0.002  # the expectation is unchanged
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient flows only through kept units
    assert drop.eval()(x) is x


@pytest.mark.parametrize("p_in,p_hidden", [(0.2, 0.5), (0.5, 0.0)])
def test_hidden_dropout_acts_after_every_hidden_layer_at_its_own_rate(p_in, p_hidden):
    """Hidden weights 0 and biases 1 make every hidden activation exactly 1 whatever the input, so
    what reaches the next layer is the hidden dropout's mask alone: zeros at the rate p_hidden
    (not the input's p_in), the rest 1 / (1 - p_hidden), after the last hidden layer too."""
    torch.manual_seed(3)
    m, seen = MLP(hidden=[64, 64], dropout_input=p_in, dropout_hidden=p_hidden).train(), {}
    with torch.no_grad():
        for layer in m.hidden:
            layer.weight.zero_(), layer.bias.fill_(1.0)
    for name, layer in (("second", m.hidden[1]), ("out", m.out)):
        layer.register_forward_pre_hook(lambda layer, args, name=name: seen.__setitem__(name, args[0]))
    m(torch.rand(200, 784))
    for name in ("second", "out"):
        kept = seen[name] != 0
        assert abs(1 - kept.float().mean().item() - p_hidden) < 0.03, name
        assert torch.allclose(seen[name][kept], torch.tensor(1 / (1 - p_hidden))), name


# a checkpoint's arch rebuilds the same model, each dropout rate in its place (specialists are built so)
def test_build_mlp_keeps_each_dropout_rate_in_its_place():
    arch = MLP(hidden=[8], dropout_input=0.2, dropout_hidden=0.5).arch
    clone = build_mlp(arch)
    assert clone.arch == arch and clone.drop_in.p == 0.2 and clone.drop_hidden.p == 0.5
