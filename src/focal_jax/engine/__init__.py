"""The training engine: experiment config, train step, loop, work dir, mesh, evaluation, inference.

Data flows one way: `focal_jax.data` batches -> `train_step` (jitted over a
`mesh`) -> `inference.predict_step` -> `evaluation` (pycocotools). `loop`
ties them together in `train_and_evaluate`; `workdir` owns what a run leaves
on disk. Needs the `[train]` extra (TensorFlow, tensorflow-datasets,
pycocotools).
"""
