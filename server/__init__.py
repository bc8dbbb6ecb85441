"""The coordinator: a Flower ServerApp that sends the global LoRA adapter to the sites,
aggregates their updates with SecAgg+, evaluates centrally and checkpoints every round.

Installed as ``fedtune.server``; in a Flower App bundle it is the ``server`` component.
"""
