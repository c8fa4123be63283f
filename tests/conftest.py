import os
import sys

# Test helpers (e.g. tests/trainers/hf_configs.py) import by module name.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "trainers"))
