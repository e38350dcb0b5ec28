"""A kernel that declares contiguous inputs only (Impl.layouts) but never checks: handed a
strided tensor it reads it with contiguous strides and returns garbage instead of raising."""

import dataclasses

from attnbench.zoo._base import member
from attnbench.zoo.strided_as_contiguous import StridedAsContiguous

layout_unchecked = dataclasses.replace(
    member("layout_unchecked", StridedAsContiguous(),
           "declares contiguous inputs only, computes garbage on others instead of raising"),
    layouts=("contiguous",),
    grad_layouts=("contiguous",),
)
