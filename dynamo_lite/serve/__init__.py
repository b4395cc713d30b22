"""`python -m dynamo_lite.serve`: a frontend and its workers in one command, a replacement for
`vllm serve` (docs/serve.md).

`args` reads the command line (serve's options, the frontend's it passes on, the rest for every worker),
`placement` gives each engine its cores or GPUs, `progress` draws the loading display, `start` starts
everything on the launch scripts' Stack and supervisor (dynamo_lite.launch).
"""
