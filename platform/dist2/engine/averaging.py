"""An exponential moving average of the trained weights (`train.ema_decay`), evaluated and deployed in their place.

Why: a short schedule's final weights depend on the order of the last images it saw; an average over the last few
hundred steps depends on it less. This is the "EMA weights" of modern detectors (YOLOX, Ge et al. 2021, §2.1) and
Polyak averaging (Polyak & Juditsky 1992) with an exponential window. The average is bias-corrected as Adam's
moments are (Kingma & Ba 2015, §3): update t folds the weights in at rate (1 - decay) / (1 - decay^t), so it is the
exponentially weighted mean of the weights visited so far, with no share left to the untrained initial ones and the
window (~1 / (1 - decay) steps) in force from the start. (TensorFlow's and YOLOX's warm-up of the decay itself
would hold it below 0.99 for the first ~900 steps: longer than the quick schedules.)

Every float tensor of the module's state is averaged (BatchNorm running statistics too); integer buffers (step
counters) are copied.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class WeightAverage:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.module, self.decay, self.updates = module, decay, 0
        self.average = {name: value.detach().clone() for name, value in module.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        """Fold the module's current weights in; called after every optimiser step."""
        self.updates += 1
        rate = (1 - self.decay) / (1 - self.decay ** self.updates)
        for name, value in self.module.state_dict().items():
            if value.is_floating_point():
                self.average[name].lerp_(value.detach(), rate)
            else:
                self.average[name].copy_(value)

    @contextlib.contextmanager
    def applied(self) -> Iterator[dict[str, torch.Tensor]]:
        """The module holds the averaged weights inside the block and its own again after it; yields a copy of
        its own (the weights training continues from, which a resume state must hold)."""
        trained = {name: value.detach().clone() for name, value in self.module.state_dict().items()}
        self.module.load_state_dict(self.average)
        try:
            yield trained
        finally:
            self.module.load_state_dict(trained)

    def state_dict(self) -> dict:
        return {"average": self.average, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        for name, value in state["average"].items():
            self.average[name].copy_(value)
