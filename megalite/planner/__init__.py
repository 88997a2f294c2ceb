"""megalite-plan: per-rank memory and step time of a layout, and the search for the best one.

Pure Python over megalite's own modules (built on the meta device to count parameters) and
schedules (run in virtual time for the bubble); no process group is needed.
See docs/planner.md.
"""

from megalite.planner.devices import DEVICES, Device, cpu_device, get_device
from megalite.planner.layout import Layout, Runtime, apply_layout, apply_moe
from megalite.planner.memory import RankMemory, plan_memory
from megalite.planner.plan import Plan, format_plan, format_search, plan_for, search
from megalite.planner.steptime import StepTime, estimate_step_time

__all__ = [
    "DEVICES",
    "Device",
    "Layout",
    "Plan",
    "RankMemory",
    "Runtime",
    "StepTime",
    "apply_layout",
    "apply_moe",
    "cpu_device",
    "estimate_step_time",
    "format_plan",
    "format_search",
    "get_device",
    "plan_for",
    "plan_memory",
    "search",
]
