"""Quick checks of qcompile.zoo: models build, run, export; real data trains; MiniLM embeds."""
import pytest
import torch
from torch import nn

import _zoo as zoo


@pytest.fixture(scope="module", params=list(zoo.MODEL_NAMES))
def named_model(request):
    model, inputs = zoo.get_model(request.param)
    return request.param, model, inputs


EXPECTED_SHAPES = {"resnet18": (1, 1000), "mobilenet_v2": (1, 1000), "bert_encoder": (2, 32, 256), "digits_cnn": (8, 10)}


def test_models_run_and_export(named_model):
    name, model, inputs = named_model
    assert not model.training
    with torch.no_grad():
        out = model(*inputs)
    assert tuple(out.shape) == EXPECTED_SHAPES[name]
    assert torch.isfinite(out).all()
    ep = torch.export.export(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*inputs), out)


def test_resnet18_topology():
    m = zoo.resnet18_shaped(num_classes=10)
    assert sum(isinstance(x, zoo.BasicBlock) for x in m.modules()) == 8
    assert sum(p.numel() for p in zoo.resnet18_shaped().parameters()) == 11_689_512  # torchvision's count


def test_mobilenet_variants_and_bn_calibration():
    m = zoo.make_mobilenet_v2(seed=1, width_mult=0.5, res=64)
    acts = {type(x) for x in m.modules()}
    assert {nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Dropout} <= acts
    depthwise = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.groups > 1]
    assert depthwise and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    bn = m.features[0][1]
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # calibrated
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    plain = zoo.mobilenet_v2_shaped(num_classes=5, se=False)
    assert not any(isinstance(x, zoo.SqueezeExcite) for x in plain.modules())


def test_determinism():
    a, b = zoo.make_resnet18(seed=3, res=64), zoo.make_resnet18(seed=3, res=64)
    x = zoo.image_batches(1, batch=2, res=64, seed=9)[0]
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    imgs = zoo.image_batches(2, batch=3, res=32, seed=5)
    assert len(imgs) == 2 and imgs[0].shape == (3, 3, 32, 32)
    torch.testing.assert_close(imgs[1], zoo.image_batches(2, batch=3, res=32, seed=5)[1])
    # neighbouring pixels correlate ("natural-ish")
    x = imgs[0]
    corr = torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1]
    assert corr > 0.5


def test_bert_encoder_mask_and_default():
    m = zoo.make_bert_encoder(layers=2)
    ids, mask = zoo._bert_inputs()
    with torch.no_grad():
        full = m(ids)
        torch.testing.assert_close(full, m(ids, torch.ones_like(mask)))
        masked = m(ids, mask)
        # padded keys must not influence the unpadded tokens of row 1
        ids2 = ids.clone()
        ids2[1, 24:] = 7
        torch.testing.assert_close(m(ids2, mask)[1, :24], masked[1, :24])


def test_digits_cnn_trains():
    x_tr, y_tr, x_te, y_te = zoo.load_digits_data(seed=0)
    assert x_tr.shape == (1347, 1, 8, 8) and x_te.shape == (450, 1, 8, 8)
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    model, (_, _, x_te2, y_te2) = zoo.train_digits_cnn(epochs=15, seed=0)
    torch.testing.assert_close(x_te2, x_te)
    assert zoo.accuracy(model, x_te, y_te) >= 0.95
    assert zoo.accuracy(lambda x: (model(x),), x_te, y_te, batch=100) == zoo.accuracy(model, x_te, y_te)


def test_minilm_embeddings():
    try:
        model, tok = zoo.load_minilm()
    except ImportError as e:
        pytest.skip(str(e))
    assert not model.training and model.config.hidden_size == 384
    emb = zoo.embed(model, tok, zoo.SENTENCES)
    assert emb.shape == (len(zoo.SENTENCES), 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(zoo.SENTENCES)))
    sim = emb @ emb.T
    for i, j in zoo.PARAPHRASE_PAIRS:
        assert sim[i, j] > sim[i, (j + 5) % len(zoo.SENTENCES)] + 0.1
        sim_i = sim[i].clone()
        sim_i[i] = -1
        assert sim_i.argmax().item() == j  # nearest neighbour is the paraphrase
    # callable returning a tuple gives the same embeddings
    alt = zoo.embed(lambda ids, mask: (model(ids, mask).last_hidden_state,), tok, zoo.SENTENCES[:4], max_length=64)
    torch.testing.assert_close(alt, zoo.embed(model, tok, zoo.SENTENCES[:4], max_length=64), atol=1e-5, rtol=1e-5)
