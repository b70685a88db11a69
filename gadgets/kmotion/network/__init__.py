"""The k-space motion network (the abstract's Figure 1) and its safe (no-pickle) storage."""

from kmotion.network.model import KMotionNet, NetConfig
from kmotion.network.storage import load_model, save_model

__all__ = ["KMotionNet", "NetConfig", "load_model", "save_model"]
