"""WebDataset data layer: shard writer, DataModules, demo data, feature caches."""

from datamodules.demo import DemoDataModule
from datamodules.folder import ShardFolderDataModule
from datamodules.webdataset import ShardLoader, ShardStream, WebDataModule

__all__ = ["DemoDataModule", "ShardFolderDataModule", "ShardLoader", "ShardStream", "WebDataModule"]
