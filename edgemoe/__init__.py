"""edgemoe: run sparse mixture-of-experts vision-language models inside a fixed memory budget.

The package is laid out along the data flow: `model` reads checkpoints, `reference` is the torch
model exports are validated against, `export`/`quant` write bundles, `offload`/`runtime` run them,
`bench` measures them. Importing `edgemoe` imports neither torch nor transformers.
"""

__version__ = "0.1.0"
