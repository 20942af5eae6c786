"""WebDataset data layer: shard writer, DataModules, demo data, feature caches."""

from datamodules.demo import DemoDataModule
from datamodules.webdataset import ShardLoader, ShardStream, WebDataModule

__all__ = ["DemoDataModule", "ShardLoader", "ShardStream", "WebDataModule"]
