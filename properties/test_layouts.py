"""Memory layouts: every property draws them (Spec.layout, Spec.grad_layout, built by
Spec.make_inputs); this file checks what an implementation that accepts only some of them
promises: the others are rejected with an error, never computed into garbage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnbench.properties.harness import check_rejects
from attnbench.properties.strategies import draw_spec
from attnbench.spec import GRAD_LAYOUTS, LAYOUTS

pytestmark = pytest.mark.variant("dense", "local")


@given(data=st.data())
def test_undeclared_layouts_are_rejected(impl, device, data):
    """An implementation that declares only some layouts (Impl.layouts / grad_layouts) raises
    on inputs in another layout, or on a grad_out in another layout in its backward."""
    others = [name for name in LAYOUTS if name not in impl.layouts]
    grad_others = [name for name in GRAD_LAYOUTS if name not in impl.grad_layouts]
    if "backward" not in impl.features:
        grad_others = []
    if not others and not grad_others:
        pytest.skip(f"{impl.key} accepts every layout")
    spec = draw_spec(data, impl, device)
    if spec is None:
        return
    kinds = (["inputs"] if others else []) + (["grad_out"] if grad_others else [])
    kind = data.draw(st.sampled_from(kinds), label="kind")
    if kind == "inputs":
        check_rejects(impl, spec.replace(layout=data.draw(st.sampled_from(others), label="layout")))
    else:
        check_rejects(impl, spec.replace(grad_layout=data.draw(st.sampled_from(grad_others), label="grad_layout")))
