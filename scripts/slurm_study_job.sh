#!/usr/bin/env bash
# The body of every job that scripts/slurm_study.sh submits (not meant to be run by hand):
#   slurm_study_job.sh STEP SHARDS MAX_RESTARTS PYTHON SETUP [run_study.py options ...]
# STEP: sources or targets (array task i runs shard i/SHARDS of that step) or report. It runs in the
# repository root (sbatch --chdir). run_study.py runs in the background and this shell waits for it,
# so that the USR1 which --signal=B:USR1@... sends before the time limit is handled at once: the task
# requeues itself (unless it has been restarted MAX_RESTARTS times) and, requeued, resumes from the
# last validation of the run it was in. Its exit status is run_study.py's.
set -uo pipefail

[ $# -ge 5 ] || { echo "usage: slurm_study_job.sh STEP SHARDS MAX_RESTARTS PYTHON SETUP [options]" >&2; exit 2; }
step=$1 shards=$2 max_restarts=$3 python=$4 setup=$5
shift 5

case "$step" in
    sources) step_args=(--steps sources --source_shard "${SLURM_ARRAY_TASK_ID:?not an array task}/$shards") ;;
    targets) step_args=(--steps random similarity ensemble targets --shard "${SLURM_ARRAY_TASK_ID:?not an array task}/$shards") ;;
    report) step_args=(--steps report) ;;
    *) echo "error: slurm_study_job.sh: unknown step $step (expected sources, targets or report)" >&2; exit 2 ;;
esac
stamp() { date '+%F %T'; }
me=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
me=${me:-${SLURM_JOB_ID:-?}}
echo "=== $(stamp) job $me (id ${SLURM_JOB_ID:-?}) on $(hostname -s): ${step_args[*]}," \
    "restart ${SLURM_RESTART_COUNT:-0}"
export PYTHONUNBUFFERED=1  # printed lines reach the log in order with the logged ones
if [ -n "$setup" ]; then
    eval "$setup" || { echo "error: slurm_study_job.sh: SETUP failed: $setup" >&2; exit 1; }
fi

requeue_before_time_limit() {
    if [ "${SLURM_RESTART_COUNT:-0}" -lt "$max_restarts" ]; then
        echo "=== $(stamp) USR1 (time limit near): requeueing job $me; it resumes from the last validation"
        scontrol requeue "$me" \
            || echo "=== scontrol requeue $me failed: the task ends at its time limit; submit the same command again"
        # ($me, not $SLURM_JOB_ID: the id of one array task is also the whole array's)
    else
        echo "=== $(stamp) USR1 (time limit near): restarted ${SLURM_RESTART_COUNT:-0} times already (MAX_RESTARTS)," \
            "not requeued; submit the same command again to resume"
    fi
}
trap requeue_before_time_limit USR1

"$python" run_study.py "$@" "${step_args[@]}" &
child=$!
while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2> /dev/null || break  # still alive: wait returned for a trapped signal
done
echo "=== $(stamp) job $me: run_study.py exited with status $rc"
exit "$rc"
