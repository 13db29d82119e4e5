#!/usr/bin/env bash
# Builds the companion as a static HTML book (set-up included). ./tools/build_book.sh --help
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

usage() {
  cat <<'EOF'
Usage: ./tools/build_book.sh [--out DIR]

Builds a static HTML book from the README (its landing page, included as it is) and the committed,
executed notebooks in notebooks/ with their stored outputs: nothing is executed. Sphinx with myst-nb and
sphinx-book-theme (book/conf.py); math is MathJax, served from the book itself, so it reads offline.
Warnings are errors: a broken link, a missing image or bad markup fails the build.

Set-up is automatic: .venv as ./run_tests.sh makes it, with requirements.txt, which includes the book's
pinned tools (book/requirements.txt; installed again when either file changes).

--out DIR  where the book goes (default: build/book); it is rebuilt from scratch every time.
Open DIR/index.html in a browser (file:// works; no web server needed).
EOF
}

out=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }
           out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    *) echo "error: unknown argument $1 (see ./tools/build_book.sh --help)" >&2; exit 2 ;;
  esac
done
out="${out:-$REPO/build/book}"
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ] && [ ! -f "$out/.buildinfo" ]; then
  echo "error: $out is not empty and holds no earlier book (no .buildinfo): choose another --out" >&2; exit 2
fi
rm -rf "$out"  # an earlier book: nothing of it is kept (a page whose notebook is gone would stay)
mkdir -p "$out"
out="$(cd "$out" && pwd)"

ensure_env  # requirements.txt, which includes book/requirements.txt; and again when the book's pins alone changed:
want="$(cat "$REPO/requirements.txt" "$REPO/book/requirements.txt" | sha256sum | cut -d' ' -f1)"
have="$(cat "$VENV/.book-requirements.sha256" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
  echo "setting up: installing book/requirements.txt into $VENV" >&2
  "$PY" -m pip install --disable-pip-version-check -q -r "$REPO/requirements.txt" >&2
  echo "$want" > "$VENV/.book-requirements.sha256"
fi

cd "$REPO"
# -E: read every page afresh, so that every warning is raised on every build; -W --keep-going: report all of
# them, then fail. The source folder is the repository (book/conf.py says which files are pages).
"$PY" -m sphinx -b html -c book -E -W --keep-going -q -d "$out/.doctrees" . "$out"
echo "book: $out/index.html"
