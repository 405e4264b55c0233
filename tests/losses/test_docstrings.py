"""Every public loss follows the docstring template, and its example runs as written."""

import doctest

import jax.numpy as jnp
import pytest

from jkd import losses as L

PUBLIC = [getattr(L, n) for n in L.__all__ if n not in ("attention_map", "teacher_topk")]


@pytest.mark.parametrize("fn", PUBLIC, ids=lambda f: f.__name__)
def test_docstring_template(fn):
    doc = fn.__doc__
    for section in ("math::", "Args:", "Returns:", "Example:", "References:"):
        assert section in doc, f"{fn.__name__} docstring lacks {section}"
    assert "[...]" in doc.split("Returns:")[1], f"{fn.__name__} must state its per-example shape"


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
