"""SIGTERM / SIGUSR1 ask the run to checkpoint at the next step and exit cleanly (Slurm preemption)."""

from __future__ import annotations

import signal


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name

    def agreed(self, accelerator) -> bool:
        """True on every rank if any rank was signalled, so all ranks stop at the same step."""
        import torch

        flag = torch.tensor([1.0 if self.signal_name else 0.0])
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag.to(accelerator.device), reduction="sum").cpu()
        return bool(flag.item() > 0)
