"""Parameter trees: flatten / unflatten round trips, views, errors and arithmetic."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel import tree as T

DT = torch.float64


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed + 17 * len(shape) + sum(shape))
    return torch.randn(*shape, dtype=DT, generator=g)


def _trees():
    """(id, builder) pairs covering every container kind and nesting."""
    return {
        "tensor": lambda: _rand(3, 4),
        "scalar_tensor": lambda: torch.tensor(2.5, dtype=DT),
        "dict": lambda: {"w": _rand(2, 3), "b": _rand(3, seed=1)},
        "list": lambda: [_rand(2), _rand(1, 2, seed=2), _rand(4, seed=3)],
        "tuple": lambda: (_rand(5), _rand(2, 2, seed=4)),
        "nested": lambda: {
            "layer": {"weight": _rand(3, 2), "bias": _rand(3, seed=5)},
            "heads": [_rand(2, seed=6), (_rand(1, seed=7), {"s": _rand(2, 2, seed=8)})],
            "t": (_rand(4, seed=9),),
        },
    }


TREES = _trees()


def _assert_same_tree(a, b):
    """Same containers (types, keys, order), same leaf shapes, dtypes and values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
        return
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            _assert_same_tree(a[k], b[k])
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_tree(x, y)


def _flat_reference(tree):
    return torch.cat([t.reshape(-1) for t in T.leaves(tree)])


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", list(TREES))
def test_flatten_unflatten_round_trip(name):
    tree = TREES[name]()
    vec, spec = T.flatten(tree)
    assert vec.dim() == 1
    assert vec.shape[0] == spec.size == sum(t.numel() for t in T.leaves(tree))
    assert vec.dtype == DT
    assert torch.equal(vec, _flat_reference(tree))
    back = T.unflatten(vec, spec)
    _assert_same_tree(back, tree)


@pytest.mark.parametrize("name", list(TREES))
def test_unflatten_of_new_vector_places_values_in_order(name):
    tree = TREES[name]()
    _, spec = T.flatten(tree)
    v = torch.arange(spec.size, dtype=DT)
    back = T.unflatten(v, spec)
    assert torch.equal(_flat_reference(back), v)
    assert [t.shape for t in T.leaves(back)] == list(spec.shapes)


@pytest.mark.parametrize("name", list(TREES))
def test_unflatten_returns_views_of_the_vector(name):
    tree = TREES[name]()
    vec, spec = T.flatten(tree)
    vec = vec.clone()
    back = T.unflatten(vec, spec)
    vec.fill_(7.0)
    for leaf in T.leaves(back):
        assert torch.all(leaf == 7.0)
    # and the other way round: writing into a leaf writes into the vector
    T.leaves(back)[0].reshape(-1)[0] = -1.0
    assert vec[0].item() == -1.0


def test_single_tensor_flatten_is_a_view():
    t = _rand(3, 4)
    vec, spec = T.flatten(t)
    assert spec.structure is None
    assert vec.data_ptr() == t.data_ptr()
    vec[5] = 123.0
    assert t.reshape(-1)[5].item() == 123.0


def test_multi_leaf_flatten_copies_and_does_not_alias():
    tree = {"a": _rand(2), "b": _rand(3)}
    before = {k: v.clone() for k, v in tree.items()}
    vec, _ = T.flatten(tree)
    vec.fill_(0.0)
    _assert_same_tree(tree, before)


def test_spec_properties_and_paths():
    tree = TREES["nested"]()
    spec = T.tree_spec(tree)
    assert spec.num_leaves == 6
    assert spec.numels == tuple(t.numel() for t in T.leaves(tree))
    assert spec.size == sum(spec.numels)
    assert spec.paths == ("layer.weight", "layer.bias", "heads[0]", "heads[1][0]", "heads[1][1].s", "t[0]")
    assert spec.shapes == ((3, 2), (3,), (2,), (1,), (2, 2), (4,))


def test_same_structure():
    a = T.tree_spec({"w": _rand(2, 3), "b": _rand(3)})
    b = T.tree_spec({"w": torch.zeros(2, 3, dtype=DT), "b": torch.zeros(3, dtype=DT)})
    c = T.tree_spec({"w": torch.zeros(3, 2, dtype=DT), "b": torch.zeros(3, dtype=DT)})
    d = T.tree_spec({"b": torch.zeros(3, dtype=DT), "w": torch.zeros(2, 3, dtype=DT)})
    assert T.same_structure(a, b)
    assert not T.same_structure(a, c)
    assert not T.same_structure(a, d)
    assert not T.same_structure(T.tree_spec([_rand(2)]), T.tree_spec((_rand(2),)))


# --------------------------------------------------------------------------- errors


def test_mixed_dtype_raises_type_error_naming_dtypes():
    tree = {"a": torch.zeros(2, dtype=torch.float32), "b": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(TypeError, match=r"float32.*float64|float64.*float32"):
        T.flatten(tree)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA) to mix devices")
def test_mixed_device_raises_value_error():
    tree = {"a": torch.zeros(2, dtype=DT), "b": torch.zeros(2, dtype=DT, device="cuda")}
    with pytest.raises(ValueError, match="devices"):
        T.flatten(tree)


@pytest.mark.parametrize(
    "tree, path",
    [
        ({"a": torch.zeros(2, dtype=DT), "b": 3.0}, "'b'"),
        ({"layer": {"w": torch.zeros(2, dtype=DT), "b": [1.0, 2.0]}}, r"'layer\.b\[0\]'"),
        ([torch.zeros(2, dtype=DT), "oops"], r"'\[1\]'"),
    ],
)
def test_non_tensor_leaf_raises_type_error_naming_path(tree, path):
    with pytest.raises(TypeError, match=rf"found \w+ at {path}"):
        T.flatten(tree)


def test_non_tensor_leaf_error_uses_what_name():
    with pytest.raises(TypeError, match=r"^theta must be a tensor"):
        T.flatten({"x": None}, what="theta")


@pytest.mark.parametrize("empty", [{}, [], (), {"a": [], "b": {}}])
def test_empty_tree_raises_value_error(empty):
    with pytest.raises(ValueError, match="holds no tensors"):
        T.flatten(empty)


def test_unflatten_wrong_length_raises_value_error():
    _, spec = T.flatten({"w": _rand(2, 3), "b": _rand(3)})
    with pytest.raises(ValueError, match=r"length 9.*got shape \(8,\)"):
        T.unflatten(torch.zeros(8, dtype=DT), spec)
    with pytest.raises(ValueError, match=r"length 9.*got shape \(10,\)"):
        T.unflatten(torch.zeros(10, dtype=DT), spec)


def test_unflatten_non_1d_raises_value_error():
    _, spec = T.flatten(_rand(3, 3))
    with pytest.raises(ValueError, match=r"1-D vector of length 9"):
        T.unflatten(torch.zeros(3, 3, dtype=DT), spec)


# --------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("name", list(TREES))
def test_dot_matches_flat(name):
    a = TREES[name]()
    b = T.map(lambda t: torch.sin(3 * t) + 0.5, a)
    fa, _ = T.flatten(a)
    fb, _ = T.flatten(b)
    expected = torch.dot(fa, fb)
    got = T.dot(a, b)
    assert got.dim() == 0 and got.dtype == DT
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(TREES))
def test_norm_matches_flat(name):
    a = TREES[name]()
    fa, _ = T.flatten(a)
    torch.testing.assert_close(T.norm(a), torch.linalg.vector_norm(fa), rtol=1e-12, atol=1e-12)


def test_norm_known_value():
    assert T.norm([torch.tensor([3.0], dtype=DT), torch.tensor([[4.0]], dtype=DT)]).item() == pytest.approx(5.0)
    assert T.norm({"x": torch.tensor([3.0, 4.0], dtype=DT)}).item() == pytest.approx(5.0)


@pytest.mark.parametrize("name", list(TREES))
@pytest.mark.parametrize("alpha", [2.5, -0.75, "tensor"])
def test_axpy_matches_flat_and_does_not_modify_inputs(name, alpha):
    x = TREES[name]()
    y = T.map(lambda t: torch.cos(t) - 1.0, x)
    a = torch.tensor(-1.25, dtype=DT) if alpha == "tensor" else alpha
    x0 = T.map(torch.clone, x)
    y0 = T.map(torch.clone, y)
    out = T.axpy(a, x, y)
    fx, _ = T.flatten(x)
    fy, _ = T.flatten(y)
    fo, spec = T.flatten(out)
    assert T.same_structure(spec, T.tree_spec(y))
    torch.testing.assert_close(fo, a * fx + fy, rtol=1e-13, atol=1e-13)
    _assert_same_tree(x, x0)
    _assert_same_tree(y, y0)


@pytest.mark.parametrize("name", list(TREES))
def test_zeros_like(name):
    a = TREES[name]()
    z = T.zeros_like(a)
    fz, spec = T.flatten(z)
    assert T.same_structure(spec, T.tree_spec(a))
    assert fz.dtype == DT
    assert torch.count_nonzero(fz).item() == 0
    assert type(z) is type(a)


@pytest.mark.parametrize("name", list(TREES))
def test_map_matches_flat(name):
    a = TREES[name]()
    b = T.map(lambda t: 2 * t + 1, a)
    out = T.map(lambda s, t: s * t - torch.exp(s), a, b)
    fa, _ = T.flatten(a)
    fb, _ = T.flatten(b)
    fo, spec = T.flatten(out)
    assert T.same_structure(spec, T.tree_spec(a))
    torch.testing.assert_close(fo, fa * fb - torch.exp(fa), rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------- describe


def test_describe_dict_names_keys_and_shapes():
    spec = T.tree_spec({"weight": torch.zeros(2, 3, dtype=DT), "bias": torch.zeros(3, dtype=DT)})
    text = spec.describe()
    assert "dict" in text
    assert "weight: (2, 3)" in text
    assert "bias: (3,)" in text
    assert T.describe({"weight": torch.zeros(2, 3, dtype=DT), "bias": torch.zeros(3, dtype=DT)}) == text


def test_describe_nested_and_tensor():
    text = T.tree_spec({"layer": {"w": torch.zeros(4, 1, dtype=DT)}, "h": [torch.zeros(5, dtype=DT)]}).describe()
    assert "layer.w: (4, 1)" in text
    assert "h[0]: (5,)" in text
    assert T.tree_spec(torch.zeros(7, 2, dtype=DT)).describe() == "a tensor of shape (7, 2)"
    assert "list" in T.tree_spec([torch.zeros(1, dtype=DT)]).describe()
    assert "tuple" in T.tree_spec((torch.zeros(1, dtype=DT),)).describe()


def test_module_named_parameters_is_a_tree():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    params = dict(model.named_parameters())
    vec, spec = bl.tree.flatten(params)
    assert spec.paths == ("weight", "bias")
    assert vec.shape == (8,)
    back = bl.tree.unflatten(vec, spec)
    torch.testing.assert_close(back["weight"], model.weight.detach())
    torch.testing.assert_close(back["bias"], model.bias.detach())
