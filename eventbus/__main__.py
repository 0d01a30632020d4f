import logging
import os
import sys

from .cli import main

code = main()
# Everything is closed by now; skipping interpreter teardown keeps the C++
# client's static destructors from racing Python's finalisation.
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
