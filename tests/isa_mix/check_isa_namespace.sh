#!/bin/bash
# Usage: check_isa_namespace.sh <include dir>
# Fails (exit 1, naming file and line) when a header under <include dir> breaks the ISA-namespace
# rule of detail/config.hpp (docs/build.md#mixing-isa-flags):
#  1. every opening of namespace blockattn is `namespace blockattn {` followed by
#     `inline namespace BLOCKATTN_ISA_NAMESPACE {` (tools/isa_ns.py rewrites the others, including
#     C++17 nested names such as `namespace blockattn::detail {`);
#  2. every header that uses the tag reaches detail/config.hpp through its blockattn includes
#     (an undefined macro would silently name the namespace BLOCKATTN_ISA_NAMESPACE);
#  3. every ISA feature macro a header tests in #if / #elif / #ifdef is one that config.hpp knows,
#     i.e. appears in config.hpp (which derives the tag from the features that select code).
set -u
inc=${1:?usage: check_isa_namespace.sh <include dir>}
config=blockattn/detail/config.hpp
tag=BLOCKATTN_ISA_NAMESPACE
status=0
cd "$inc" || exit 1
[ -f "$config" ] || { echo "check_isa_namespace: $inc/$config not found"; exit 1; }
mapfile -t headers < <(find blockattn -name '*.hpp' -o -name '*.h' | sort)

# 1. Openings. Comments and blank lines may stand between the two lines.
for h in "${headers[@]}"; do
  out=$(awk -v tag="$tag" -v file="$h" '
    function report(msg) { printf "%s:%d: %s\n", file, open_line, msg; bad = 1 }
    pending && /^[[:space:]]*(\/\/.*)?$/ { next }
    pending {
      if ($0 !~ "^[[:space:]]*inline[[:space:]]+namespace[[:space:]]+" tag "[[:space:]]*\\{")
        report("`namespace blockattn {` not followed by `inline namespace " tag " {`")
      pending = 0
    }
    /^[[:space:]]*namespace[[:space:]]+blockattn[[:space:]]*::/ {
      open_line = NR
      report("nested `" $0 "` cannot carry the tag in C++17: run tools/isa_ns.py")
      next
    }
    /^[[:space:]]*namespace[[:space:]]+blockattn[[:space:]]*\{/ {
      open_line = NR
      rest = $0; sub(/^[^{]*\{/, "", rest)
      if (rest ~ "inline[[:space:]]+namespace[[:space:]]+" tag) next
      pending = 1
    }
    /namespace[[:space:]]+blockattn[[:space:]]*\{/ && !/^[[:space:]]*namespace/ && !/^[[:space:]]*\/\// {
      open_line = NR
      report("`namespace blockattn` opened mid-line: put it on its own line and run tools/isa_ns.py")
    }
    END { if (pending) report("`namespace blockattn {` at the end of the file") ; exit bad }
  ' "$h") || { echo "$out"; status=1; }
done

# 2. The tag's definition reaches every header that uses it: headers that include config.hpp, or a
# header already known to reach it, reach it too (iterated to a fixed point).
reach=" $config "
changed=1
while [ $changed = 1 ]; do
  changed=0
  for h in "${headers[@]}"; do
    case $reach in *" $h "*) continue ;; esac
    for dep in $(sed -n 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*<\(blockattn\/[^>]*\)>.*/\1/p' "$h"); do
      case $reach in
        *" $dep "*) reach="$reach$h "; changed=1; break ;;
      esac
    done
  done
done
for h in "${headers[@]}"; do
  [ "$h" = "$config" ] && continue
  if grep -q "$tag" "$h"; then
    case $reach in
      *" $h "*) ;;
      *) echo "$h: uses $tag but does not include <$config> (directly or through a blockattn header)"
         status=1 ;;
    esac
  fi
done

# 3. Feature macros tested by the headers, each known to config.hpp.
work=$(mktemp)
trap 'rm -f "$work"' EXIT
for h in "${headers[@]}"; do
  [ "$h" = "$config" ] && continue
  grep -n -E '^[[:space:]]*#[[:space:]]*(if|elif|ifdef|ifndef)\b' "$h" |
    grep -o -E '^[0-9]+:|__(AVX|SSE|SSSE|F16C|FMA|AMX|BMI|ARM_FEATURE|ARM_NEON|aarch64|VNNI|POPCNT|LZCNT)[A-Za-z0-9_]*' |
    awk -v file="$h" '/^[0-9]+:$/ { line = $0; sub(":", "", line); next } { print file ":" line ":" $0 }'
done >"$work"
while IFS=: read -r file line macro; do
  if ! grep -q -- "$macro" "$config"; then
    echo "$file:$line: tests $macro, which $config does not know: add it to the ISA selection or" \
         "the ISA namespace's name there (two TUs must not share a definition whose code differs)"
    status=1
  fi
done <"$work"

[ $status = 0 ] && echo "check_isa_namespace: ${#headers[@]} headers, every blockattn namespace tagged"
exit $status
