"""The client training loop, owned by the library: every algorithm's local training goes through it.

- ``config``: the ``train`` section's schema (torch-free, read by the configuration);
- ``loop``: ``local_training`` (the one minibatch loop), ``evaluate``, the ``Batch``/loss conventions;
- ``optimizers``, ``grouped_optimizer``: the loop's optimisers, learning-rate schedules, kept optimiser state;
- ``tasks``, ``task_checks``: classification, next-token and regression tasks, user losses, and their validation;
- batched clients (``train.client_batch``): ``stacked`` (stacked parameters and forward), ``batch_plan``,
  ``batched`` (K clients trained at once), ``proximal``, ``batched_eval``, ``blocks`` (an algorithm's client
  steps driven in blocks), ``block_eval`` (evaluation and fine-tuning of blocks), ``client_batch`` (choosing K).

Modules are imported on use: ``pfl_mpi.training.config`` does not import torch."""
