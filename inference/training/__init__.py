"""Training the reference models on synthetic phantoms (torch: the optional ``train`` extra).

Never imported by the service. One command trains both reference models and exports
them to ONNX::

    .venv/bin/pip install -e '.[train]'
    .venv/bin/python -m inference.training --out inference/models

Seeds: training phantoms use seeds from :data:`TRAIN_SEED_START` up; every evaluation
(``bench/accuracy.py``) uses seeds below it, so no evaluated phantom was ever trained on.
Validation phantoms, from :data:`VALIDATION_SEED_START` up, are neither trained nor
evaluated on: the reporting threshold in ``model.toml`` is chosen on them, so that choosing
it does not look at the evaluation phantoms. The nodule model's rescorer is fitted on the
training-range phantoms after the network's own (by default seeds 100150-100249), which the
network never saw: its false positives there are the ones it makes on new scans.
"""

TRAIN_SEED_START = 100_000
VALIDATION_SEED_START = 200_000
EVAL_SEED_START = 0
