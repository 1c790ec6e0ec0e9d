"""`python -m simulator [--fleet FILE] [--control-port N]`: the same as `gpu-router simulate`."""

import argparse
import sys

from simulator.run import add_arguments, main

parser = argparse.ArgumentParser(
    prog="python -m simulator", description="Run a simulated Ollama fleet.", allow_abbrev=False
)
add_arguments(parser)
sys.exit(main(parser.parse_args()))
