"""Lightning callbacks: FID/IS evaluation, sample grids (and preemption handling)."""

from callbacks.fid import FIDCallback
from callbacks.sample_grid import SampleGridCallback
from callbacks.sampling import SamplePlan

__all__ = ["FIDCallback", "SampleGridCallback", "SamplePlan"]
