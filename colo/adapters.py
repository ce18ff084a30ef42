"""An adapter's training state: its LoRA shape, its version and its AdamW optimizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colo.types import AdamParams, LoraConfig


@dataclass
class Adapter:
    id: str
    lora: LoraConfig
    seed: int
    params: dict[str, torch.nn.Parameter]  # PEFT key -> the live parameter
    optimizer: torch.optim.AdamW
    version: int = 0  # bumped by every optim_step; version 0 is the initialisation

    @classmethod
    def create(cls, id: str, lora: LoraConfig, seed: int, params: dict[str, torch.nn.Parameter]) -> Adapter:
        optimizer = torch.optim.AdamW(list(params.values()), lr=0.0, foreach=False)
        return cls(id=id, lora=lora, seed=seed, params=params, optimizer=optimizer)

    def set_hyperparameters(self, adam: AdamParams) -> None:
        for group in self.optimizer.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                         weight_decay=adam.weight_decay)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """AdamW state keyed ``<peft key>.<exp_avg|exp_avg_sq|step>``: no pickle needed to save it."""
        out = {}
        for key, p in self.params.items():
            for name, value in self.optimizer.state.get(p, {}).items():
                out[f"{key}.{name}"] = torch.as_tensor(value).detach().cpu().clone()
        return out

    def snapshot(self) -> tuple[list[torch.Tensor], dict]:
        """Copies, on the device, of the weights and the AdamW state, for ``restore``."""
        weights = [p.detach().clone() for p in self.params.values()]
        state = {p: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                 for p, s in self.optimizer.state.items()}
        return weights, state

    def restore(self, snapshot: tuple[list[torch.Tensor], dict]) -> None:
        weights, state = snapshot
        with torch.no_grad():
            for p, w in zip(self.params.values(), weights):
                p.copy_(w)
        self.optimizer.state.clear()
        self.optimizer.state.update(state)

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, p in self.params.items():
            state = {name: tensors[f"{key}.{name}"].to(p.device) for name in ("step", "exp_avg", "exp_avg_sq")
                     if f"{key}.{name}" in tensors}
            if state:
                state["step"] = state["step"].to("cpu", torch.float32)
                self.optimizer.state[p] = state
