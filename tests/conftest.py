import os
import sys
from pathlib import Path

# Distributed tests run on CPU processes with gloo, never on a GPU that may be present.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, str(Path(__file__).parent))
