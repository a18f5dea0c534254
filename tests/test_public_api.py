"""The public API documents itself: every public name has a docstring (what ``help()`` shows), and no two public
names of the library are spelled alike for different things."""
import importlib
import inspect

import pytest

# The modules a user imports names from.
PUBLIC_MODULES = ["fastadvseg", "fastadvseg.functional", "fastadvseg.nn", "fastadvseg.models", "fastadvseg.data",
                  "fastadvseg.metrics"]


def _public_names(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__.startswith("fastadvseg"):
            yield name, obj


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(module_name):
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no module docstring"
    missing = [name for name, obj in _public_names(module) if not (obj.__doc__ or "").strip()]
    assert not missing, f"{module_name}: no docstring for {missing}"


def test_no_two_public_names_alike_for_different_things():
    seen = {}
    for module_name in PUBLIC_MODULES:
        for name, obj in _public_names(importlib.import_module(module_name)):
            if name in seen and seen[name][1] is not obj:
                pytest.fail(f"{seen[name][0]}.{name} and {module_name}.{name} are different things")
            seen.setdefault(name, (module_name, obj))


def test_nn_modules_match_their_functions():
    import torch

    import fastadvseg as fas
    import fastadvseg.nn as fnn

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 3, generator=gen)
    d = torch.randn(2, 1, 4, 3, generator=gen)
    target = torch.randint(0, 5, (2, 4, 3), generator=gen)
    out = fnn.GeneratorLoss(lambda_adv=0.01)(logits, d, target)
    assert isinstance(out, fas.GeneratorLossOutput)
    torch.testing.assert_close(out.total, fas.generator_loss(logits, d, target, lambda_adv=0.01).total)
    torch.testing.assert_close(fnn.CrossEntropy2d()(logits, target), fas.cross_entropy2d(logits, target))
