"""Launching, process meshes and counted collectives."""

from core.distributed.comm import AxisGroup, CommStats
from core.distributed.launch import DistEnv, Runtime, detect, launch
from core.distributed.mesh import AXES, Layout, ParallelMesh, resolve_layout

__all__ = ["AXES", "AxisGroup", "CommStats", "DistEnv", "Layout", "ParallelMesh", "Runtime",
           "detect", "launch", "resolve_layout"]
