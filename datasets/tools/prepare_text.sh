#!/usr/bin/env bash
# Build the English training / held-out corpora used to train the small model
# behind datasets/default/*.safetensors.
#
# Sources (Debian 12 "bookworm" packages, reStructuredText prose of two manuals):
#   python3.11-doc  3.11.2-6+deb12u9   usr/share/doc/python3.11/html/_sources/**/*.txt
#   linux-doc-6.1   6.1.192-2          usr/share/doc/linux-doc-6.1/html/_sources/**/*.txt
#
# Get the packages first, e.g.:
#   mkdir -p /tmp/textsrc && cd /tmp/textsrc && apt-get download python3.11-doc linux-doc-6.1
# then, from the repository root:
#   datasets/tools/prepare_text.sh /tmp/textsrc .txt
#
# Split is BY FILE: a file is held out when the first 8 hex digits of
# sha1("<package>/<path under _sources>") taken mod 50 equal 0 (about 2% of
# files). Files are concatenated in C-locale sorted order, each preceded by a
# blank line. Output: <outdir>/train.txt.xz, <outdir>/heldout.txt.xz,
# <outdir>/heldout-files.txt (list of held-out files).
set -euo pipefail
src=${1:-/tmp/textsrc}
out=${2:-.txt}
export LC_ALL=C
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for deb in "$src"/python3.11-doc_*.deb "$src"/linux-doc-6.1_*.deb; do
  [ -f "$deb" ] || { echo "missing $deb" >&2; exit 1; }
  dpkg-deb -x "$deb" "$work/root"
done
mkdir -p "$out"
: >"$work/train.txt"; : >"$work/heldout.txt"; : >"$work/heldout-files.txt"
ntrain=0; nheld=0
for pkg in python3.11 linux-doc-6.1; do
  base="$work/root/usr/share/doc/$pkg/html/_sources"
  [ -d "$base" ] || { echo "no $base" >&2; exit 1; }
  while IFS= read -r rel; do
    h=$(printf '%s/%s' "$pkg" "$rel" | sha1sum | cut -c1-8)
    if [ $(( 16#$h % 50 )) -eq 0 ]; then
      dst="$work/heldout.txt"; echo "$pkg/$rel" >>"$work/heldout-files.txt"; nheld=$((nheld+1))
    else
      dst="$work/train.txt"; ntrain=$((ntrain+1))
    fi
    { printf '\n'; cat "$base/$rel"; printf '\n'; } >>"$dst"
  done < <(cd "$base" && find . -type f -name '*.txt' | sed 's|^\./||' | sort)
done
echo "files: train=$ntrain heldout=$nheld"
wc -c "$work/train.txt" "$work/heldout.txt"
xz -9 -T0 -c "$work/train.txt" >"$out/train.txt.xz"
xz -9 -T0 -c "$work/heldout.txt" >"$out/heldout.txt.xz"
cp "$work/heldout-files.txt" "$out/heldout-files.txt"
ls -l "$out"
