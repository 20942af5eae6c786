"""Lightning callbacks: FID/IS and judge (class accuracy, judge FD) evaluation, sample grids, preemption."""

from callbacks.fid import FIDCallback
from callbacks.judge import JudgeCallback
from callbacks.sample_grid import SampleGridCallback
from callbacks.sampling import SamplePlan

__all__ = ["FIDCallback", "JudgeCallback", "SampleGridCallback", "SamplePlan"]
