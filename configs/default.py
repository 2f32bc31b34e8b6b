"""The CPU demo: a small VLM that learns the procedural suite with SFT then G²RPO on 2 cores.

  python -m openvlthinker.main --config=configs/default.py --workdir=/tmp/ovt
"""
from openvlthinker.configuration import base_config


def get_config(arg=None):
  del arg
  return base_config()
