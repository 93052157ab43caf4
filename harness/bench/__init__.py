"""Measuring the harness: ``dmlbench benchmark`` (the model step against a plain timm loop, the data
path stage by stage, train() end to end, concurrent trials, evaluation speed) and the GPU window
(``benchmarks/gpu.sh``: staged, capped, every record kept). It stands on every layer below it
(training, studies, data, retrieval); nothing imports it but the command line."""
