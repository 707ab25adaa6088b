#!/bin/sh
# Checks of the python role, offline: a venv that pip-installs a wheel built right here,
# uv, and an LSP initialize handshake with pylsp.
set -eu
d=$(mktemp -d)
cd "$d"
python3 - <<'PY'
import base64, hashlib, zipfile
files = {
    "kilncheck/__init__.py": b"def answer():\n    return 42\n",
    "kilncheck-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: kilncheck\nVersion: 0.1\n",
    "kilncheck-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: kiln\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
with zipfile.ZipFile("kilncheck-0.1-py3-none-any.whl", "w") as z:
    for name, data in files.items():
        z.writestr(name, data)
        h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={h},{len(data)}")
    record.append("kilncheck-0.1.dist-info/RECORD,,")
    z.writestr("kilncheck-0.1.dist-info/RECORD", "\n".join(record) + "\n")
PY
python3 -m venv venv
venv/bin/pip install -q --no-index --disable-pip-version-check ./kilncheck-0.1-py3-none-any.whl
test "$(venv/bin/python -c 'import kilncheck; print(kilncheck.answer())')" = 42
uv --version
uv venv -q --offline uvenv
test -x uvenv/bin/python
kiln-lsp-check pylsp
echo "python: ok ($(python3 --version))"
