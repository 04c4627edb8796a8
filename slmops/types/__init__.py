"""Leaf value types shared by every layer: model names, digests and the error tree."""

from slmops.types.digest import Digest
from slmops.types.errors import *  # noqa: F403
from slmops.types.errors import SlmopsError
from slmops.types.name import ModelName

__all__ = ["Digest", "ModelName", "SlmopsError"]
