"""`demo`: the main job end to end on this machine, with nothing configured (`run.py`).

The package holds what the demo needs and a pull never does (its dependencies come with the `demo`
extra; the tests and bench/ use it too): `seaweed.py` the embedded S3 server, `model.py` a small real
model, `shapes.py` the repo shapes vLLM meets, `seed.py` a model folder laid out as a Hugging Face cache.
This file imports nothing: `bench/vllm_check.py` generates shapes with vLLM's own Python, which has no
boto3, so importing a module of the package must not load the pull.
"""
