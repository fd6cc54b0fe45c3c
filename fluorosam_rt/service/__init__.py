"""The node as a service: the pipeline and everything around it that runs while it serves.

``node`` (the frame pipeline, ``Node``), ``serve`` (settings -> a running node), ``node_config``
(the settings file), ``control`` (the prompt and status server), ``publish`` (the mask stream),
``flow`` (per-stage timings), ``security`` (CURVE keys) and ``node_cli`` (``fluorosam-rt serve``
and its siblings). The layers between them are checked by import-linter (pyproject.toml); this
file imports nothing, so importing one module does not load the others.
"""
