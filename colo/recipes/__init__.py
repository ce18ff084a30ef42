"""The demo's recipe: its task (small additions), its GRPO loop and its scripts' flags.

Not part of the library's core: ``examples/``, the learning test and the RL benchmark import these so
they run one task the same way. A recipe stands on the Trainer's public API only.
"""
