"""`ray submit docker/cluster.yaml docker/ablate_on_head.py -- ABLATION [dist2 ablate options]`.

`ray submit` copies this script to the head node and runs it there with Python. It runs `dist2 ablate` from the
image's copy of the repository (/home/ray/dist2), where the ablation and experiment files are.
"""

import os
import sys

from dist2.cli import main

if __name__ == "__main__":
    os.chdir(os.environ.get("DIST2_HOME", "/home/ray/dist2"))
    sys.exit(main(["ablate", *sys.argv[1:]]))
