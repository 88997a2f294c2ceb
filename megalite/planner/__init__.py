"""megalite-plan: per-rank memory and step time of a layout, and the search for the best one.

Pure Python over megalite's own modules (built on the meta device to count parameters) and
schedules; no process group is needed. See docs/planner.md.
"""

from megalite.planner.layout import Layout, Runtime, apply_layout
from megalite.planner.memory import RankMemory, plan_memory

__all__ = ["Layout", "RankMemory", "Runtime", "apply_layout", "plan_memory"]
