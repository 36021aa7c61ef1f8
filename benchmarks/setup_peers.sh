#!/usr/bin/env bash
# Create the two peer virtualenvs used by benchmarks/peer_easyedit.py and benchmarks/peer_fastedit.py:
#   $PEERS_DIR/easyedit-venv  EasyEdit  (PyPI easyeditor 0.0.1.dev0) + transformers 5.5.4
#   $PEERS_DIR/fastedit-venv  FastEdit  (PyPI pyfastedit 0.0.5)       + transformers 5.24.0
# Both use CPU torch 2.13.0 (this machine's pip finds the CPU wheel on local disk; a bare `torch` would pull a
# multi-GB CUDA build). Nothing in site-packages is edited: the run-time workarounds live in the runner scripts
# and are listed in benchmarks/PEERS.md. Usage: bash benchmarks/setup_peers.sh   (PEERS_DIR, PYTHON optional)
set -euo pipefail

PEERS_DIR=${PEERS_DIR:-/work/peers}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
EE="$PEERS_DIR/easyedit-venv"
FE="$PEERS_DIR/fastedit-venv"
mkdir -p "$PEERS_DIR"
CONS=$(mktemp)
trap 'rm -f "$CONS"' EXIT

pipq() { "$@" 2>&1 | grep -v -e "^WARNING: Location" -e "^ERROR: pip's dependency resolver" -e "requires .*, but you have" || true; }

# ---------------------------------------------------------------- EasyEdit
# easyeditor 0.0.1.dev0 pins torch==2.0.1, transformers==4.30.1, numpy==1.22.1, ... (no Python 3.11 CPU path), so
# it is installed with --no-deps and its imports are satisfied with current releases, pinned below as tested.
# torchvision 0.28.0 pairs with torch 2.13; its PyPI wheel is CUDA-linked (its _C.so fails to load on CPU torch),
# which peer_easyedit.py works around at import time (it only serves EasyEdit's BLIP-2/multimodal modules).
# timm 0.9.7 is EasyEdit's own pin (newer timm needs more of torchvision); higher 0.2.1 pins an old torch: no deps.
printf 'torch==2.13.0\ntorchvision==0.28.0\ntransformers==5.5.4\n' >"$CONS"
[ -x "$EE/bin/python" ] || "$PY" -m venv "$EE"
pipq "$EE/bin/pip" install -q -c "$CONS" torch==2.13.0 torchvision==0.28.0 transformers==5.5.4
pipq "$EE/bin/pip" install -q --no-deps easyeditor==0.0.1.dev0 timm==0.9.7 higher==0.2.1
pipq "$EE/bin/pip" install -q -c "$CONS" \
    accelerate==1.15.0 datasets==5.2.0 einops==0.8.2 fairscale==0.4.13 hydra-core==1.3.8 iopath==0.1.10 \
    matplotlib==3.11.2 nltk==3.10.4 omegaconf==2.3.1 openai==3.57.0 opencv-python-headless==5.0.0.93 \
    pandas==3.1.1 peft==0.21.2 pillow==13.0.0 python-dateutil==4.0.0 PyYAML==6.0.4 scikit-learn==1.9.1 \
    scipy==1.17.1 sentence-transformers==6.2.0 safetensors huggingface_hub
"$EE/bin/python" - "$HERE" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import peer_easyedit as p
w = []
p._compat_before_import(w)
import easyeditor, torch, transformers
print("easyedit-venv OK: easyeditor imports with torch", torch.__version__, "transformers", transformers.__version__,
      "| workarounds:", [x["id"] for x in w])
EOF

# ---------------------------------------------------------------- FastEdit
# pyfastedit 0.0.5 declares torch>=1.13.1, transformers>=4.29.1, datasets, accelerate, sentencepiece, fire: its
# own dependencies install as they are (torch pinned to the CPU build).
printf 'torch==2.13.0\n' >"$CONS"
[ -x "$FE/bin/python" ] || "$PY" -m venv "$FE"
pipq "$FE/bin/pip" install -q -c "$CONS" torch==2.13.0 pyfastedit==0.0.5 transformers==5.24.0
"$FE/bin/python" -c "import fastedit, torch, transformers; print('fastedit-venv OK: pyfastedit', fastedit.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
