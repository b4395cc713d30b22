# What container/build.sh and container/run.sh share (sourced, not run): their errors, --help from the
# script's header comment, options that take a value (`--opt VALUE` or `--opt=VALUE`), and running the
# docker command or, with --dry-run, printing it.

PROG="container/$(basename "$0")"

die() { printf '%s: error: %s\n' "${PROG}" "$*" >&2; exit 2; }

# The comment block at the top of the script, after the #! line, without its leading "# ".
show_help() {
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
    exit 0
}

# value OPTION "$@": the value of OPTION at the head of the arguments ("--opt VALUE" or "--opt=VALUE").
# Callers shift by shift_by afterwards (2 or 1).
value() {
    local option=$1; shift
    if [[ "$1" == "${option}="* ]]; then
        VALUE="${1#*=}" shift_by=1
    elif (( $# >= 2 )); then
        VALUE="$2" shift_by=2
    else
        die "${option} needs a value"
    fi
    [[ -n "${VALUE}" ]] || die "${option} needs a value"
}

# run_docker DRY_RUN COMMAND...: print COMMAND (DRY_RUN=1) or replace this shell with it.
run_docker() {
    local dry_run=$1; shift
    if (( dry_run )); then
        printf '%q ' "$@"; echo
        exit 0
    fi
    command -v docker >/dev/null 2>&1 || die "docker not found"
    exec "$@"
}
