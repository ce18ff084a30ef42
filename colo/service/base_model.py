"""The base model as clients name and see it: the served name and the other names it answers to, what
``get_info`` and the capabilities list say about it, and the tokenizer the OpenAI routes use.

Read once from the Trainer when the service starts: none of it changes while the service runs.
"""

from __future__ import annotations

from colo import default_model
from colo.errors import InvalidRequestError
from colo.trainer import Trainer


class BaseModel:
    def __init__(self, trainer: Trainer, model_name: str | None = None) -> None:
        configured = model_name or trainer.config.model
        self.name = default_model.HUB_ID if default_model.is_default(configured) else configured
        # names a client may use for the base model: the served name, the short name, the local path
        self.names = {self.name, configured, trainer.model_path}
        if default_model.is_default(configured):
            self.names.add(default_model.NAME)
        self.path = trainer.model_path
        self.arch = trainer.policy.architecture
        self.max_len = trainer.max_len
        self.tokenizer = trainer.tokenizer
        self.eos_token_ids = trainer.policy.eos_token_ids

    def check(self, base_model: str | None) -> None:
        if base_model is not None and base_model not in self.names:
            raise InvalidRequestError(f"base_model {base_model!r} is not served here; allowed: {self.name!r}")

    def model_data(self) -> dict:
        """What ``get_info`` says of the base model under a LoRA."""
        return {"arch": self.arch, "model_name": self.name, "tokenizer_id": self.path}

    def capabilities(self) -> dict:
        return {"supported_models": [{"model_name": self.name, "max_context_length": self.max_len,
                                      "trainable": True, "sampleable": True}]}
