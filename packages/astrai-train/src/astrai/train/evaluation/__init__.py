"""Evaluation of model directories on lm-evaluation-harness (lm-eval), not on a harness of our own.

``lm_model.AstraiLM`` is lm-eval's ``astrai`` model, in process: log-likelihoods come from a
batched forward of the model, generation from our InferenceEngine at full batch, so every
lm-eval task and metric runs on our directories. ``cli`` is the ``astrai-eval`` command;
``task_data`` and ``code_exec`` are the helpers the local task YAMLs under configs/eval/ name
with ``!function`` (documents from local files, pass@k by running code in a subprocess).

lm-eval is an optional dependency (``pip install 'astrai-train[eval]'``): importing this package
does not import it, ``lm_model`` does.
"""
