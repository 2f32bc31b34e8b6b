"""TFDS builders of fixed snapshots of the suite (importing this package registers them)."""
from openvlthinker.data.tfds.suite_snapshot import OpenvlthinkerSuite
from openvlthinker.data.tfds.suite_snapshot import SnapshotConfig
from openvlthinker.data.tfds.suite_snapshot import SnapshotSource

__all__ = ["OpenvlthinkerSuite", "SnapshotConfig", "SnapshotSource"]
