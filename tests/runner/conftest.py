import sys
from pathlib import Path

# kit_loop.py (the tests' recipe loop over the training kit) is imported by the tests here and by
# the child scripts they launch.
sys.path.insert(0, str(Path(__file__).parent))
