"""Examples: a DDP script with a switchagg hook (`ddp_hook.py`) and a comparison on a model of
your own (`own_model.py`); each runs as a script or imports as `switchagg.workers.examples.*`."""
