import os
import sys

# Never touch the network: every model in the tests is built in-process or read from assets/.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tinyworld  # noqa: E402

tinyworld.write_references()  # the shapes world's references, when pytest runs without make (~1 s, once)
