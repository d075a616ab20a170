"""Process groups for work split across processes (``accelerate launch``), on GPUs or CPUs."""

from __future__ import annotations

from typing import Any

import torch


def process_state(force_cpu: bool = False) -> Any:
    """accelerate's ``PartialState``; CPU processes (no CUDA, ``--cpu``) join a gloo group.

    ``PartialState()`` alone treats ranks launched on a machine without GPUs as separate
    single-process runs, so CPU mode is requested explicitly.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = force_cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def gather_objects(items: list[Any], state: Any) -> list[Any]:
    """Concatenate a list from every process, in rank order (objects are pickled)."""
    if state.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def broadcast_object(obj: Any, state: Any) -> Any:
    """The main process's ``obj`` on every process."""
    if state.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj])[0]


def end_processes(state: Any) -> None:
    """Leave a multi-process run's group (one process: nothing to do). A gloo process that exits with
    its group still up can abort (SIGABRT, "terminate called without an active exception") while the
    interpreter shuts down, so the command-line entry points end their group before returning."""
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()
