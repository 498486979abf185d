import sys
from pathlib import Path

# layouts.py (files in the official key layouts, random values) is shared by the test folders.
sys.path.insert(0, str(Path(__file__).parent))
