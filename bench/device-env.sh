# Source this on a GPU host that has torch/transformers/peft but not this
# project installed (e.g. the lent device machine): installs the carried
# wheels in .whl/ (pydantic, fastapi, uvicorn, ...) into /tmp/site and makes
# `htrctl` and `htrd` importable from the checkout without pip-installing it.
#   source bench/device-env.sh
set -e
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
mkdir -p /tmp/site
ln -sfn "$PWD/daemon" /tmp/site/htrd
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="/tmp/site/bin:$PATH"  # console scripts of the carried wheels (py-spy)
export PYTHONUNBUFFERED=1
set +e
