#!/usr/bin/env bash
# Print the path of a Python 3.10 interpreter (Lava needs exactly 3.10).
set -u
for c in python3.10 "$(command -v pyenv >/dev/null 2>&1 && echo "$(pyenv root)/versions/3.10"*/bin/python3.10)" /root/.pyenv/versions/3.10*/bin/python3.10 /usr/bin/python3.10 /usr/local/bin/python3.10; do
  [ -n "$c" ] || continue
  for p in $c; do
    if "$p" -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then
      command -v "$p" 2>/dev/null || echo "$p"; exit 0
    fi
  done
done
echo "error: no Python 3.10 interpreter found (Lava 0.10.0 needs 3.10); install one or set PYTHON310=/path/to/python3.10" >&2
exit 1
