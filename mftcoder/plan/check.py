"""Every training run checks the plan: one line of prediction at the start, the measurement next to it at the end."""

from __future__ import annotations

import dataclasses
import resource

import torch
from tqdm import tqdm

from mftcoder.config import Config
from mftcoder.plan.memory import GIB
from mftcoder.plan.planner import Plan, Target, make_plan
from mftcoder.plan.shape import PlanError


@dataclasses.dataclass
class PlanCheck:
    """The plan made for this run (None when plan has no formulas for its model) and whether this rank prints."""

    plan: Plan | None
    device: torch.device
    speak: bool

    @staticmethod
    def start(config: Config, env, total_steps: int, steps_per_epoch: int, padding_mode: str) -> "PlanCheck":
        """Plan the run as it is set up (its real step count, the batch shape its start-up check chose) and print the
        predicted peak and time."""
        config = dataclasses.replace(config, padding_mode=padding_mode)
        memory = torch.cuda.get_device_properties(env.device).total_memory if env.device.type == "cuda" else None
        try:
            plan = make_plan(config, Target(env.device.type, env.world_size, memory), steps=total_steps,
                             steps_per_epoch=steps_per_epoch)
        except PlanError as exc:
            plan = None
            line = f"plan: no prediction ({exc})"
        else:
            line = (f"plan: predicted peak {plan.memory.peak / GIB:.2f} GiB of training tensors per rank "
                    f"({plan.device_peak / GIB:.2f} GiB with runtime and allocator), {plan.step_seconds:.2f} s per step, "
                    f"{plan.step_seconds * total_steps:.0f} s for {total_steps} steps (`mftcoder plan` for details)")
        if env.is_main:
            tqdm.write(line)
        return PlanCheck(plan, env.device, env.is_main)

    def end(self, train_seconds: float, steps: int) -> None:
        """The measured peak and step time next to the prediction (CUDA: the allocator's peak of tensors; CPU: the
        process's peak RSS, against tensors plus runtime and allocator)."""
        if not self.speak or steps == 0:
            return
        if self.device.type == "cuda":
            measured, what = torch.cuda.max_memory_allocated(self.device), "peak GPU tensors"
            predicted = self.plan.memory.peak if self.plan else None
        else:
            measured, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"
            predicted = self.plan.device_peak if self.plan else None
        step_s = train_seconds / steps
        if predicted is None:
            tqdm.write(f"plan: measured {what} {measured / GIB:.2f} GiB, {step_s:.2f} s per step")
            return
        tqdm.write(f"plan: measured {what} {measured / GIB:.2f} GiB (predicted {predicted / GIB:.2f}, ratio "
                   f"{measured / predicted:.2f}), {step_s:.2f} s per step (predicted {self.plan.step_seconds:.2f}, "
                   f"ratio {step_s / self.plan.step_seconds:.2f})")
