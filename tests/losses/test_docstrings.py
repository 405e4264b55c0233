"""Every public loss follows the docstring template, and its example runs as written."""

import doctest
import inspect

import jax.numpy as jnp
import pytest

from jkd import losses as L

# Functions only: the divergences (ForwardKL(), ...) are typed values taken by the losses.
PUBLIC = [
    getattr(L, n)
    for n in L.__all__
    if inspect.isfunction(getattr(L, n)) and n not in ("attention_map", "teacher_topk", "standardize_logits")
]
# The one loss that returns the mean, by design: its gradients are formed in the same pass
# as the value, which needs the reduction inside (see its docstring).
REDUCED = ("projected_soft_distillation_loss", "projected_token_divergence", "projected_topk_kl", "token_mean")


@pytest.mark.parametrize("fn", PUBLIC, ids=lambda f: f.__name__)
def test_docstring_template(fn):
    doc = fn.__doc__
    for section in ("math::", "Args:", "Returns:", "Example:", "References:"):
        assert section in doc, f"{fn.__name__} docstring lacks {section}"
    returns = doc.split("Returns:")[1]
    if fn.__name__ in REDUCED:
        assert "``[]``" in returns and "mean" in returns, f"{fn.__name__} must say it returns the mean"
    else:
        assert "[...]" in returns, f"{fn.__name__} must state its per-example shape"


@pytest.mark.parametrize("fn", PUBLIC, ids=lambda f: f.__name__)
def test_docstring_example_runs(fn):
    globs = {"jnp": jnp, **{n: getattr(L, n) for n in L.__all__}}
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(fn, globs=globs)
    assert tests and tests[0].examples
    for t in tests:
        runner.run(t)
    assert runner.failures == 0
