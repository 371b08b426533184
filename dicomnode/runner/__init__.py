"""The fuse stage: claims pending jobs, runs fusion/ on spool files, writes outputs via output/."""

from dicomnode.runner.stage import FuseStage

__all__ = ["FuseStage"]
