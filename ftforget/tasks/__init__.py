"""One base, many tasks: export what a method changed, put it back onto a base, serve many tasks on one
backbone, route images to tasks without a task label, and merge LoRA tasks for contrast.

- :mod:`~ftforget.tasks.delta`: a method's own tensors, the base's key names, the canonical base hash;
- :mod:`~ftforget.tasks.exported`: one task as one safetensors file (:func:`write_task`,
  :func:`read_task`) and :func:`attach_task`, the task on a base;
- :mod:`~ftforget.tasks.export`: exporting a run's checkpoint (``ftforget export``);
- :mod:`~ftforget.tasks.multitask`: :class:`MultiTaskModel`, one backbone and any number of tasks;
- :mod:`~ftforget.tasks.routing`: a router on the base's features and the stream accuracies;
- :mod:`~ftforget.tasks.merging`: task arithmetic over LoRA tasks;
- :mod:`~ftforget.tasks.digits`: all of it on the digits miniature (``ftforget demo``).
"""
