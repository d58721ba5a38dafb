"""`qanat plan`: which chip, how many, at what latency, joules and price — predicted, then calibrated.

Layout: model shapes (`model`, `gguf`, `hfconfig`, `catalog_models`), chips (`chips`), efficiency factors
(`efficiency`), one step as a roofline per component (`step`), load and queueing (`serving`), power (`power`),
predictions (`predict`), calibration from `qanat bench` results (`calibrate`), validation against published
measurements (`validation`), and the command (`cli`, `render`). Pure Python: no network, no llama.cpp.
"""
