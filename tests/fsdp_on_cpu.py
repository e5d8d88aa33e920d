"""train_accelerate.py as Accelerate runs it under accelerate_configs/fsdp2_8gpu.yaml on GPUs, on CPU processes.

    accelerate launch --multi_gpu ... tests/fsdp_on_cpu.py [train_accelerate.py's flags]   (FSDP_* in the environment)

On a CPU Accelerate runs an FSDP config as DDP; here each Accelerator's state is set as Accelerate sets it on GPUs
(accelerate/state.py), so that the run takes its GPU path: FSDP2 over gloo.
"""
from __future__ import annotations

import accelerate
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import train_accelerate

accelerator_init = accelerate.Accelerator.__init__


def init_as_on_gpus(self: accelerate.Accelerator, *args, **kwargs) -> None:
    accelerator_init(self, *args, **kwargs)
    for state in (PartialState._shared_state, AcceleratorState._shared_state):
        state["distributed_type"] = DistributedType.FSDP
    plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()  # the rest from the FSDP_* environment
    if self.mixed_precision != "no":
        plugin.set_mixed_precision(self.mixed_precision)  # keeps a policy the plugin was given
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


if __name__ == "__main__":
    accelerate.Accelerator.__init__ = init_as_on_gpus
    train_accelerate.main()
