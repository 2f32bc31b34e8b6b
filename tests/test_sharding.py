"""Mesh construction and logical-axis rule resolution."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from openvlthinker.sharding import Sharder, make_mesh


def test_mesh_fills_minus_one():
  mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("sizes", [{"data": 3, "fsdp": -1, "tensor": 1},
                                   {"data": 2, "fsdp": 2, "tensor": 1},
                                   {"data": -1, "fsdp": -1, "tensor": 1}])
def test_mesh_rejects_sizes_that_do_not_fit(sizes):
  with pytest.raises(ValueError, match="mesh"):
    make_mesh(sizes)


def test_rules_map_logical_names_and_drop_axes_that_do_not_divide():
  shd = Sharder(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  assert shd.spec(("embed", "mlp"), (64, 128)) == P("fsdp", "tensor")
  assert shd.spec(("batch", None), (8, 3)) == P(("data", "fsdp"), None)
  assert shd.spec(("batch", None), (2, 3)) == P("data", None)  # fsdp would not divide 2.
  assert shd.spec(("vocab", "embed"), (1023, 64)) == P(None, "fsdp")
  assert shd.spec(("unknown", None), (4, 4)) == P(None, None)
