#!/usr/bin/env bash
# The kmsgate test command: install what the tests need (idempotent, fast when already done),
# then lint, type-check, check the import layers and run the whole suite.
#
#   scripts/test.sh                      # everything
#   scripts/test.sh tests/test_x.py -k y # extra arguments go to pytest
#   scripts/test.sh --help               # this text; nothing is installed or run
#
# Environment:
#   KMSGATE_REQUIRE_ALL=1   a missing real component (PostgreSQL, SoftHSM, ...) fails its tests
#                           instead of skipping them (set by .ci/run)
#   KMSGATE_SKIP_INSTALL=1  skip the apt and pip steps (offline work on a prepared machine)
#   KMSGATE_FORCE_INSTALL=1 run `pip install -e .[dev]` even when everything looks installed
#   KMSGATE_TEST_WORKERS=N  pytest processes (pytest-xdist): `auto` (default: one per core, at
#                           most 4), or a number; 0 runs every test in this one process
#
# Every step runs even if an earlier check failed, so one run shows all problems; the exit
# status is non-zero if any step failed.
set -euo pipefail

case "${1:-}" in
    -h | --help)  # the header above, without its '#'s; nothing is installed or run
        sed -n '2,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p}' "${BASH_SOURCE[0]}"
        exit 0
        ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python}
APT_PACKAGES=(softhsm2 opensc postgresql openssl)

now_ms() {
    local t=${EPOCHREALTIME:-}
    if [[ -n $t ]]; then
        t=${t//[.,]/}            # microseconds; the separator follows the locale
        echo $((10#$t / 1000))
    else
        echo $((SECONDS * 1000))
    fi
}
seconds_since() { # seconds_since START_MS: "12.3"
    local ms=$(($(now_ms) - $1))
    printf '%d.%01d' $((ms / 1000)) $((ms % 1000 / 100))
}
START_MS=$(now_ms)
section() { printf '\n==> %s  [at %ss]\n' "$*" "$(seconds_since "$START_MS")"; }
warn() { printf 'test.sh: %s\n' "$*" >&2; }

FAILED=()
step() { # step NAME CMD...: run a step, print its outcome and duration; returns its status
    local name=$1 started rc=0
    shift
    section "$name"
    started=$(now_ms)
    "$@" || rc=$?
    if ((rc == 0)); then
        printf '<== %s: ok in %ss\n' "$name" "$(seconds_since "$started")"
    else
        printf '<== %s: FAILED (exit status %d) in %ss\n' "$name" "$rc" "$(seconds_since "$started")"
    fi
    return "$rc"
}
check() { # check NAME CMD...: a step whose failure is remembered; later steps still run
    if ! step "$@"; then
        FAILED+=("$1")
    fi
}

# --- 1. system packages -------------------------------------------------------------------
install_apt_packages() {
    if ! command -v dpkg >/dev/null 2>&1; then
        warn "no dpkg: not a Debian system; install ${APT_PACKAGES[*]} yourself" \
            "(tests needing them skip, or fail under KMSGATE_REQUIRE_ALL=1)"
        return 0
    fi
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed$'; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        echo "already installed: ${APT_PACKAGES[*]}"
        return 0
    fi
    echo "installing: ${missing[*]}"
    local sudo=()
    if ((EUID != 0)); then
        if ! command -v sudo >/dev/null 2>&1; then
            warn "not root and no sudo: cannot install ${missing[*]}" \
                "(tests needing them skip, or fail under KMSGATE_REQUIRE_ALL=1)"
            return 0
        fi
        sudo=(sudo)
        [[ -t 0 ]] || sudo+=(-n) # no terminal (CI): fail instead of waiting for a password
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}"
}

# --- 2. python packages -------------------------------------------------------------------
# Exit 0 when kmsgate is installed editable from this checkout and every requirement of
# .[dev] in the current pyproject.toml (expanded through kmsgate[...] self-references) is
# installed at a satisfying version; then the ~8 s `pip install -e` can be skipped.
PYTHON_INSTALL_IS_CURRENT='
import importlib.metadata as md, json, pathlib, sys, tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
root = pathlib.Path.cwd().resolve()
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
dist = md.distribution("kmsgate")
url = json.loads(dist.read_text("direct_url.json") or "{}")
assert url.get("dir_info", {}).get("editable"), "kmsgate not installed editable"
assert url.get("url") == root.as_uri(), "kmsgate installed from " + str(url.get("url"))
assert dist.version == project["version"], "kmsgate version changed"
installed = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
assert installed == project.get("scripts", {}), "console scripts changed"
name = canonicalize_name(project["name"])
todo, seen = list(project["dependencies"]), set()
todo += [f"{name}[dev]"]
while todo:
    req = Requirement(todo.pop())
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if canonicalize_name(req.name) == name:
        for extra in req.extras - seen:
            seen.add(extra)
            todo += project["optional-dependencies"][extra]
        continue
    version = md.version(req.name)
    assert req.specifier.contains(version, prereleases=True), f"{req} but {version}"
'

install_python_packages() {
    if [[ ${KMSGATE_FORCE_INSTALL:-0} != 1 ]] &&
        "$PYTHON" -P -c "$PYTHON_INSTALL_IS_CURRENT" 2>/dev/null; then
        echo "already installed: kmsgate (editable, this checkout) and all of .[dev]"
        return 0
    fi
    echo "installing kmsgate (editable) and .[dev]: pip lists each package as it goes"
    # pip's own lines (Collecting / Downloading / Installing collected packages) show progress;
    # "Requirement already satisfied" lines are dropped to keep a re-install short.
    PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install -e '.[dev]' |
        { grep -v '^Requirement already satisfied' || true; } # pipefail: pip's status
}

# --- 4. tests -------------------------------------------------------------------------------
run_pytest() {
    local rc=0 parallel=()
    # The tests start thousands of kmsgate processes (CLI calls, gateways and their workers).
    # An editable install has no bytecode, and with PYTHONDONTWRITEBYTECODE set (as in many CI
    # images) each process would compile kmsgate's sources again (~0.2 s of a 0.8 s CLI
    # call): compile them once. Python reads the files whatever that variable says, and
    # ignores any a later edit makes stale.
    env -u PYTHONDONTWRITEBYTECODE "$PYTHON" -m compileall -q -j 0 kmsgate tests scripts >/dev/null ||
        warn "compileall failed: the tests run, each process compiling kmsgate itself"
    # in parallel (each test starts the servers it needs on free ports, in its own temp dirs);
    # the slowest tests are listed, to keep the whole run within CI's 30 minutes
    if "$PYTHON" -c 'import xdist' 2>/dev/null; then
        parallel=(-n "${KMSGATE_TEST_WORKERS:-auto}" --maxprocesses 4)
    else
        warn "pytest-xdist is not installed (pip install -e '.[dev]'): one pytest process"
    fi
    "$PYTHON" -m pytest -q "${parallel[@]}" --durations 15 "$@" || rc=$?
    if ((rc == 5)); then
        warn "pytest collected no tests (exit status 5): check the arguments and tests/"
    fi
    return "$rc"
}

if [[ ${KMSGATE_SKIP_INSTALL:-0} == 1 ]]; then
    section "install: skipped (KMSGATE_SKIP_INSTALL=1)"
else
    # A failed install makes every later result meaningless: stop here.
    step "apt: ${APT_PACKAGES[*]}" install_apt_packages
    step "pip: -e .[dev]" install_python_packages
fi

check "ruff check" "$PYTHON" -m ruff check kmsgate tests scripts
check "ruff format --check" "$PYTHON" -m ruff format --check kmsgate tests scripts
check "mypy" "$PYTHON" -m mypy
check "lint-imports (layers)" "$PYTHON" -c \
    'import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())'
check "pytest" run_pytest "$@"

section "done"
if ((${#FAILED[@]})); then
    printf 'FAILED: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
echo "all steps passed"
