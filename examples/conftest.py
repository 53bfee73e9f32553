"""A downstream project's conftest: nothing to set up, the plugin provides the fixtures.

Run with ``pytest examples`` (the built-in default model), or point it at your own checkpoints:
``pytest examples --llm-model=./my-checkpoint --llm-device-map=auto --llm-precision=int8``.
"""
