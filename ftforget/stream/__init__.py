"""Continual streams: many tasks in a row, each fit starting from the previous task's final weights.

- :mod:`~ftforget.stream.config`: the stream file (tasks in order, one method, the start weights);
- :mod:`~ftforget.stream.carry`: what a task hands to the next (LoRA merged, Block Expansion deeper) and
  the accuracy of a task's kept head on a later backbone;
- :mod:`~ftforget.stream.run`: one run directory per stream, one sub-run per task, resumable;
- :mod:`~ftforget.stream.metrics`: average accuracy, forgetting, backward and forward transfer (pure).

``ftforget stream --config STREAM.yaml`` (:mod:`ftforget.commands.stream`) runs one.
"""
