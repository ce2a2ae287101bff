"""Training package for bimask-jax: models, data pipelines, the training loop, checkpoints and the
``cifar.py`` / ``imagenet.py`` / ``quickstart.py`` scripts. Uses only the public ``bimask_jax`` API."""
