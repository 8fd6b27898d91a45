#!/usr/bin/env bash
# Submit the leave-one-out study (run_study.py) to Slurm as three jobs:
#   1. sources  an array job; task i of n runs --steps sources --source_shard i/n
#   2. targets  an array job that starts when 1 has succeeded (afterok); task i of n runs
#               --steps random similarity ensemble targets --shard i/n
#   3. report   one job that starts when 2 has succeeded (afterok): --steps report
# Every argument goes to run_study.py, the same in all three jobs:
#   bash scripts/slurm_study.sh --methods adapter lora prefix --model google/t5-base-lm-adapt \
#       --tokenizer_path google/t5-base-lm-adapt --source_task_dir /data/crossfit/full \
#       --target_task_dir /data/crossfit/64shot --output_dir runs/paper
#   DRY_RUN=1 bash scripts/slurm_study.sh ...   # or --dry_run: print the sbatch lines, submit nothing
#   PARTITION=gpu TARGET_TASKS=32 THROTTLE=8 bash scripts/slurm_study.sh ...
# Before submitting, the options are checked with the study's own plan (bad task folders, methods or
# scores fail here, not after a day in the queue); the arrays are no wider than the tasks and targets.
#
# Resuming: submit the same command again. Every finished piece (a tuning run's result.json, a
# similarity part, an initial delta) is skipped, and an interrupted tuning run continues from its last
# validation (resume.safetensors, written atomically at each one). Jobs of this study that can never
# start (waiting on a failed job: DependencyNeverSatisfied) are cancelled first; while any other job of
# this study is queued or running, nothing is submitted (two jobs must not tune the same run at once).
#
# Preemption and time limits: jobs are submitted with --requeue, so a task that is preempted (on a
# cluster with PreemptMode=REQUEUE) or whose node fails goes back to the queue by itself. SIGNAL_LEAD
# seconds before its time limit a task gets USR1 (--signal=B:USR1@SIGNAL_LEAD) and requeues itself,
# at most MAX_RESTARTS times. A preempted or requeued task is stopped by SIGTERM (then SIGKILL after
# the cluster's KillWait) without saving anything more, so it loses the work since its run in progress
# last validated: at most valid_interval updates of one tuning run (pair_valid_interval of a pair
# tuning, or the one similarity part being scored), plus the restart (loading the backbone). With
# PreemptMode=CANCEL a preempted task is not requeued: submit the same command again.
#
# Each variable below can be set from the environment. Paths are relative to the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

PARTITION=${PARTITION:-}  # partition of every job (empty: the cluster's default)
ACCOUNT=${ACCOUNT:-}  # account charged (empty: your default)
TIME=${TIME:-1-00:00:00}  # time limit of each sources / targets array task (the task requeues itself near it)
CPUS=${CPUS:-4}  # CPUs per sources / targets task (data loading, decoding)
MEM=${MEM:-32G}  # memory per sources / targets task
GRES=${GRES-gpu:1}  # generic resources per sources / targets task (set to nothing, GRES=, for CPU only)
SOURCE_TASKS=${SOURCE_TASKS:-8}  # width of the sources array: shards of --source_shard (at most the tasks)
TARGET_TASKS=${TARGET_TASKS:-32}  # width of the targets array: shards of --shard (at most the targets)
THROTTLE=${THROTTLE:-}  # at most this many tasks of each array running at once (the array's %N; empty: no limit)
REPORT_TIME=${REPORT_TIME:-01:00:00}  # time limit of the report job (it reads files only, no backbone)
REPORT_MEM=${REPORT_MEM:-4G}  # memory of the report job (1 CPU, no GRES)
REQUEUE=${REQUEUE:-1}  # 1: --requeue (preempted tasks go back to the queue), 0: --no-requeue
SIGNAL_LEAD=${SIGNAL_LEAD:-300}  # seconds before the time limit that a task requeues itself
MAX_RESTARTS=${MAX_RESTARTS:-5}  # a task requeues itself at most this many times (SLURM_RESTART_COUNT)
JOB_NAME=${JOB_NAME:-}  # prefix of the job names (empty: pewe-{output_dir's name}-{hash of its path})
LOG_DIR=${LOG_DIR:-}  # one log per array task and one for the report (empty: {output_dir}/slurm)
SBATCH_EXTRA=${SBATCH_EXTRA:-}  # more sbatch options for every job, split on spaces (e.g. --qos=long --constraint=a100)
SETUP=${SETUP:-}  # shell code each job runs first (e.g. "module load cuda/12.4; source ~/pewe-venv/bin/activate")
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}  # Python with the requirements
PROGRESS=${PROGRESS:-false}  # progress bars in the job logs (run_study.py --progress; a later --progress wins)
CHECK=${CHECK:-1}  # 1: check the options with the study's plan before submitting (needs the Python environment here)
DRY_RUN=${DRY_RUN:-0}  # 1: print the sbatch lines and submit nothing (also: --dry_run as an argument)

JOB_SCRIPT=scripts/slurm_study_job.sh  # the body of every job
say() { echo "slurm_study.sh: $*"; }
fail() { echo "error: slurm_study.sh: $*" >&2; exit 1; }

# ---------------------------------------------------------------- the study's options
study_args=()
output_dir=runs/study  # run_study.py's default
while [ $# -gt 0 ]; do
    case "$1" in
        --dry_run|--dry-run) DRY_RUN=1 ;;
        --steps|--steps=*|--shard|--shard=*|--source_shard|--source_shard=*)
            fail "$1: the launcher sets the steps and shards of each job; give the other study options" ;;
        --output_dir=*|--output-dir=*) output_dir=${1#*=}; study_args+=("$1") ;;
        --output_dir|--output-dir)
            [ $# -ge 2 ] || fail "$1 needs a value"
            output_dir=$2; study_args+=("$1" "$2"); shift ;;
        *) study_args+=("$1") ;;
    esac
    shift
done
case "$PROGRESS" in true|false) ;; *) fail "PROGRESS=$PROGRESS: expected true or false" ;; esac
study_args=("--progress=$PROGRESS" "${study_args[@]}")
for v in SOURCE_TASKS TARGET_TASKS SIGNAL_LEAD MAX_RESTARTS; do
    [[ ${!v} =~ ^[0-9]+$ ]] || fail "$v=${!v}: expected a whole number"
done
[ "$SOURCE_TASKS" -ge 1 ] && [ "$TARGET_TASKS" -ge 1 ] || fail "SOURCE_TASKS and TARGET_TASKS must be >= 1"
[ -z "$THROTTLE" ] || [[ $THROTTLE =~ ^[1-9][0-9]*$ ]] || fail "THROTTLE=$THROTTLE: expected a number >= 1 or nothing"

out_abs=$(realpath -m "$output_dir")
if [ -z "$JOB_NAME" ]; then
    JOB_NAME="pewe-$(basename "$out_abs")-$(printf '%s' "$out_abs" | cksum | awk '{printf "%06x", $1 % 16777216}')"
fi
LOG_DIR=$(realpath -m "${LOG_DIR:-$out_abs/slurm}")

# ---------------------------------------------------------------- check the options, size the arrays
source_width=$SOURCE_TASKS
target_width=$TARGET_TASKS
if [ "$CHECK" = 1 ]; then
    # prints "{tasks} {targets} {1 if source_dir}" or one error line; run_study.py's own option handling
    sizes=$( (if [ -n "$SETUP" ]; then eval "$SETUP"; fi
              "$PYTHON" - "${study_args[@]}" <<'EOF'
import sys
import run_study
from pewe.cli import run_cli
from pewe.configurator import configure
from pewe.study import make_plan

def check():
    a = configure(vars(run_study), run_study.__file__, sys.argv[1:])
    p = make_plan(a)
    print(len(p.tasks), len(p.targets), 1 if p.source_dir else 0)

sys.exit(run_cli(check))
EOF
            ) | tail -n 1) || fail "the study's options were refused (above); nothing submitted (CHECK=0 skips this check)"
    read -r n_tasks n_targets reuse_sources <<< "$sizes"
    [ "$reuse_sources" = 1 ] && source_width=1  # --source_dir: the sources step only checks the files
    [ "$source_width" -le "$n_tasks" ] || source_width=$n_tasks
    [ "$target_width" -le "$n_targets" ] || target_width=$n_targets
    say "$n_tasks tasks, $n_targets targets: $source_width sources shards, $target_width targets shards"
fi

# ---------------------------------------------------------------- jobs of an earlier submission
names="$JOB_NAME-sources,$JOB_NAME-targets,$JOB_NAME-report"
if [ "$DRY_RUN" != 1 ]; then
    command -v sbatch > /dev/null || fail "sbatch not found: run this on a Slurm login node (DRY_RUN=1 prints the lines)"
    # A job whose dependency failed waits forever (DependencyNeverSatisfied): cancel it. Once it is
    # cancelled, the job after it in the chain becomes one too, a moment later: look again.
    for attempt in $(seq 30); do
        stale=() waiting=() active=()
        while IFS='|' read -r id shown state reason; do
            [ -n "$id" ] || continue
            if [ "$state" = PENDING ] && [ "$reason" = DependencyNeverSatisfied ]; then
                stale+=("$id")
            elif [ "$state" = PENDING ] && [ "$reason" = Dependency ]; then
                waiting+=("$shown $state $reason")
            else
                active+=("$shown $state $reason")
            fi
        done < <(squeue --user="$(id -un)" --noheader --name="$names" --format='%A|%i|%T|%r')
        if [ ${#active[@]} -gt 0 ]; then
            printf '  %s\n' "${active[@]}" "${waiting[@]}" >&2
            fail "jobs of this study ($JOB_NAME) are still queued or running (above): wait for them or scancel them, then submit again"
        fi
        if [ ${#stale[@]} -gt 0 ]; then
            say "cancelling jobs of an earlier submission that wait on a failed job: ${stale[*]}"
            scancel "${stale[@]}"
        fi
        [ ${#stale[@]} -gt 0 ] || [ ${#waiting[@]} -gt 0 ] || break
        sleep 2
    done
    if [ ${#waiting[@]} -gt 0 ]; then
        printf '  %s\n' "${waiting[@]}" >&2
        fail "jobs of this study ($JOB_NAME) still wait on their dependencies (above): scancel them, then submit again"
    fi
    mkdir -p "$LOG_DIR"
fi

# ---------------------------------------------------------------- the three jobs
throttle=${THROTTLE:+%$THROTTLE}
common=(--parsable --chdir="$PWD" --open-mode=append)
[ -n "$PARTITION" ] && common+=(--partition="$PARTITION")
[ -n "$ACCOUNT" ] && common+=(--account="$ACCOUNT")
if [ "$REQUEUE" = 1 ]; then common+=(--requeue); else common+=(--no-requeue); fi
read -r -a extra <<< "$SBATCH_EXTRA"
common+=("${extra[@]}")
work=(--time="$TIME" --cpus-per-task="$CPUS" --mem="$MEM" --signal="B:USR1@$SIGNAL_LEAD")
[ -n "$GRES" ] && work+=(--gres="$GRES")
job_args=("$MAX_RESTARTS" "$PYTHON" "$SETUP" "${study_args[@]}")

submit() {  # submit VAR sbatch-arguments...: the job id into VAR (dry run: print the line, VAR gets $VAR)
    local var=$1
    shift
    if [ "$DRY_RUN" = 1 ]; then
        local arg line="$var=\$(sbatch"
        for arg in "$@"; do
            case "$arg" in
                --dependency=afterok:\$*) line+=" $arg" ;;  # stays a shell variable in the printed line
                *) line+=" $(printf '%q' "$arg")" ;;
            esac
        done
        echo "$line)"
        printf -v "$var" '%s' "\$$var"
    else
        local id
        id=$(sbatch "$@") || fail "sbatch refused the $var job (above)"
        printf -v "$var" '%s' "${id%%;*}"  # --parsable prints "id" or "id;cluster"
    fi
}

[ "$DRY_RUN" = 1 ] && say "dry run: these lines would submit the study (nothing submitted)"
submit SOURCES "${common[@]}" "${work[@]}" --job-name="$JOB_NAME-sources" \
    --array="0-$((source_width - 1))$throttle" --output="$LOG_DIR/%x_%A_%a.log" \
    "$JOB_SCRIPT" sources "$source_width" "${job_args[@]}"
submit TARGETS "${common[@]}" "${work[@]}" --job-name="$JOB_NAME-targets" --dependency="afterok:$SOURCES" \
    --array="0-$((target_width - 1))$throttle" --output="$LOG_DIR/%x_%A_%a.log" \
    "$JOB_SCRIPT" targets "$target_width" "${job_args[@]}"
submit REPORT "${common[@]}" --time="$REPORT_TIME" --cpus-per-task=1 --mem="$REPORT_MEM" \
    --job-name="$JOB_NAME-report" --dependency="afterok:$TARGETS" --output="$LOG_DIR/%x_%j.log" \
    "$JOB_SCRIPT" report 1 "${job_args[@]}"
[ "$DRY_RUN" = 1 ] && exit 0

cat <<EOF
slurm_study.sh: submitted the study $out_abs
  sources  job $SOURCES  array 0-$((source_width - 1))$throttle
  targets  job $TARGETS  array 0-$((target_width - 1))$throttle, after $SOURCES succeeds
  report   job $REPORT  after $TARGETS succeeds
follow them:
  squeue --user=$(id -un) --name=$names
  sacct -j $SOURCES,$TARGETS,$REPORT --format=JobID%-14,JobName%-40,State,ExitCode,Elapsed
logs: $LOG_DIR/ (one per array task); report: $out_abs/report.md when job $REPORT has finished
after a failure or a preemption, the same command again resumes (finished pieces are skipped)
EOF
