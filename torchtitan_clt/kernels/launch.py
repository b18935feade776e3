"""Launch grids checked against CUDA's limits before a kernel is launched.

CUDA caps grid axis 0 at 2^31 - 1 programs and axes 1 and 2 at 65,535. A kernel that puts rows
(tokens, or tokens x layers) on axis 1 launches in the interpreter and on small batches, then
fails at the first real batch (4096 tokens x 16 layers = 65,536 rows, issue 28). Every Triton
launch in ``kernels/`` takes its grid from ``grid``: rows go on axis 0, and a grid that would
pass a limit stops with the shape that caused it instead of a driver error.
"""

from __future__ import annotations

MAX_GRID = (2**31 - 1, 65_535, 65_535)


def grid(*dims: int) -> tuple[int, ...]:
    """``dims`` as a launch grid, after checking each axis against ``MAX_GRID``."""
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"a Triton grid has 1 to 3 axes, got {dims}")
    for axis, (n, limit) in enumerate(zip(dims, MAX_GRID)):
        if n > limit:
            raise ValueError(
                f"launch grid {dims}: axis {axis} has {n} programs, over CUDA's limit of {limit}; "
                "the kernel must put this dimension on axis 0 or loop over it"
            )
    return tuple(int(n) for n in dims)
