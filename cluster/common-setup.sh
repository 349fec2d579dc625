#!/usr/bin/env bash
# Installs hessdist and the pinned Ray on a node. Run from the folder that holds the hessdist
# checkout (the ray-up configs copy it to ~/hessdist with file_mounts).
set -euo pipefail
python3 -m pip install -q "ray[default]==2.60.0"
python3 -m pip install -q -e ~/hessdist
