#!/usr/bin/env bash
# make test-slurm: scripts/slurm_study.sh on a real single-node Slurm cluster, not a mock.
#   bash tests/slurm/run_test.sh            (as root; about 3-4 minutes on 2 cores)
#   KEEP=1 bash tests/slurm/run_test.sh     (keep the temporary folder: configs, daemon and job logs)
# Needs root: it installs Debian's slurm-wlm, slurmdbd, munge and MariaDB (server and client core)
# when they are missing, and slurmd runs jobs as root. It starts munged, MariaDB, slurmdbd, slurmctld
# and slurmd with every file (configs, keys, sockets, spool, state, database, logs) in a temporary
# folder and free local ports, and stops every one of them on exit, failed or not.
# sacct needs real job accounting: slurmdbd with a throwaway MariaDB (skip-grant-tables, bound to
# 127.0.0.1). The lighter jobcomp/filetxt + `sacct --completion` does not read array tasks in
# Slurm 22.05 ("Unknown type ArrayJobId"), and accounting_storage/none gives no sacct at all.
#
# The tiny study (tests/slurm/make_tiny_study.py: a 2+2-layer T5, two tasks of 16/8/8 rows; LoRA, random /
# average / Loss inits, one seed, 40 updates, validation every 5) runs three ways:
#   reference  python run_study.py in one process, unsharded;
#   clean      slurm_study.sh with 2 sources shards and 2 targets shards: every array task and the
#              report COMPLETED in sacct; the results equal the reference (compare_runs.py: report.md,
#              report.csv byte for byte, every delta and resume state tensor for tensor);
#   killed     the same in a fresh folder, where a sources task gets USR1 mid-run (what
#              --signal=B:USR1@... sends before the time limit: it must requeue itself and resume) and
#              a targets task gets SIGKILL mid-run (it fails, the report job can never start); the
#              same launcher command again cancels that report job, skips what is done, resumes the
#              killed run, ends with every task COMPLETED and the reference's results.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
KEEP=${KEEP:-0}  # 1: keep the temporary folder after the test
WAIT_S=${WAIT_S:-600}  # give up on a set of jobs after this many seconds
PYTHON=${PYTHON:-$REPO/.venv/bin/python}  # Python with the requirements (make install)
export OMP_NUM_THREADS=1  # the reference and the jobs: same thread count, same bits
export PATH=$PATH:/usr/sbin:/sbin
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server-core mariadb-client-core)  # Debian's
NEEDED=(sbatch:slurm-wlm slurmctld:slurm-wlm slurmd:slurm-wlm slurmdbd:slurmdbd munged:munge
        mariadbd:mariadb-server-core mariadb-install-db:mariadb-server-core mariadb:mariadb-client-core
        my_print_defaults:mariadb-client-core)  # command:package

say() { echo "test-slurm: $*"; }
fail() { echo "test-slurm: FAILED: $*" >&2; exit 1; }

# ---------------------------------------------------------------- packages
missing=()
for pair in "${NEEDED[@]}"; do
    command -v "${pair%%:*}" > /dev/null || [[ " ${missing[*]} " == *" ${pair#*:} "* ]] || missing+=("${pair#*:}")
done
if [ "$(id -u)" != 0 ]; then
    fail "needs root: it installs ${PACKAGES[*]} with apt-get when missing (missing now: ${missing[*]:-none})" \
        "and runs slurmd, which starts jobs as root; run it as root (sudo make test-slurm)"
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
fi
[ -x "$PYTHON" ] || fail "$PYTHON: no Python with the requirements (make install first)"

# ---------------------------------------------------------------- the cluster, in a temporary folder
T=$(mktemp -d /tmp/pewe-slurm-test.XXXXXX)
chmod 755 "$T"
mkdir -p "$T"/{etc,log,state,spool,munge,db,study,runs}
chmod 711 "$T/munge"
export SLURM_CONF=$T/etc/slurm.conf
started=()  # pid files of the daemons started, in start order

stop_daemon() {  # stop_daemon PIDFILE: TERM, then KILL after 20 s
    local pidfile=$1 pid i
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2> /dev/null || return 0
    for i in $(seq 200); do kill -0 "$pid" 2> /dev/null || return 0; sleep 0.1; done
    echo "test-slurm: $pidfile: pid $pid ignored SIGTERM, sending SIGKILL" >&2
    kill -KILL "$pid" 2> /dev/null || true
}

cleanup() {
    local rc=$? i pids
    set +e
    trap - EXIT INT TERM
    if [ -s "$T/slurmctld.pid" ]; then  # end every job of this cluster first
        scancel --user="$(id -un)" 2> /dev/null
        for i in $(seq 100); do [ -z "$(squeue --noheader 2> /dev/null)" ] && break; sleep 0.2; done
        pids=$(scontrol listpids 2> /dev/null | awk 'NR > 1 && $1 ~ /^[0-9]+$/ {print $1}')
        [ -n "$pids" ] && kill -KILL $pids 2> /dev/null
    fi
    for ((i = ${#started[@]} - 1; i >= 0; i--)); do stop_daemon "${started[$i]}"; done
    if [ "$rc" != 0 ]; then
        echo "test-slurm: daemon logs (last lines):" >&2
        for f in "$T"/log/*.log; do echo "--- $f" >&2; tail -n 15 "$f" >&2; done
    fi
    if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then
        echo "test-slurm: kept $T (configs, logs, runs)" >&2
    else
        rm -rf "$T"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_ports() {  # free_ports N: N local TCP ports nobody listens on now
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: run COMMAND until it succeeds
    local limit=$1 what=$2 i
    shift 2
    for i in $(seq $((limit * 5))); do "$@" > /dev/null 2>&1 && return 0; sleep 0.2; done
    fail "$what not ready after $limit s"
}

start_cluster() {
    local host cpus mem ctld_port slurmd_port dbd_port db_port
    host=$(hostname -s)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
    mem=$(( $(free -m | awk '/^Mem:/ {print $2}') * 8 / 10 ))  # a bit below the machine's memory
    read -r ctld_port slurmd_port dbd_port db_port <<< "$(free_ports 4)"

    # munge: a fresh key, its own socket
    dd if=/dev/urandom of="$T/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$T/munge/munge.key"
    munged --force --key-file="$T/munge/munge.key" --socket="$T/munge/munge.socket" \
        --pid-file="$T/munge/munged.pid" --log-file="$T/log/munged.log" --seed-file="$T/munge/munged.seed"
    started+=("$T/munge/munged.pid")
    wait_for 10 munged munge -S "$T/munge/munge.socket" -n

    # MariaDB for slurmdbd (a throwaway database: no grant tables, local TCP only)
    mariadb-install-db --no-defaults --user=root --datadir="$T/db/data" --skip-test-db \
        --auth-root-authentication-method=normal --innodb-log-file-size=8M > "$T/log/mariadb-install.log" 2>&1 \
        || fail "mariadb-install-db failed (see $T/log/mariadb-install.log)"
    mariadbd --no-defaults --user=root --datadir="$T/db/data" --socket="$T/db/mariadbd.sock" --port="$db_port" \
        --bind-address=127.0.0.1 --pid-file="$T/db/mariadbd.pid" --log-error="$T/log/mariadbd.log" \
        --skip-grant-tables --innodb-buffer-pool-size=32M --innodb-log-file-size=8M > /dev/null 2>&1 &
    started+=("$T/db/mariadbd.pid")
    wait_for 60 MariaDB mariadb --no-defaults -h 127.0.0.1 -P "$db_port" -u root -e "select 1"

    cat > "$T/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$T/munge/munge.socket
DbdHost=localhost
DbdPort=$dbd_port
SlurmUser=root
LogFile=$T/log/slurmdbd.log
PidFile=$T/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=root
StorageLoc=pewe_test_acct
EOF
    chmod 600 "$T/etc/slurmdbd.conf"
    # proctrack/linuxproc and task/none: no cgroup plugin (this machine has cgroup v1 only, in a sandbox)
    cat > "$SLURM_CONF" <<EOF
ClusterName=pewetest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$T/munge/munge.socket
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/log/slurmctld.log
SlurmdLogFile=$T/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
AccountingStoragePass=$T/munge/munge.socket
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
    started+=("$T/slurmdbd.pid")
    wait_for 30 slurmdbd sacctmgr --noheader list cluster

    slurmctld
    started+=("$T/slurmctld.pid")
    wait_for 30 slurmctld scontrol ping
    slurmd
    started+=("$T/slurmd.pid")
    wait_for 30 "node $host" bash -c "sinfo --noheader --responding --states=idle --format=%n | grep -qx '$host'"
    say "cluster up: $host, $cpus CPUs, $mem MB; Slurm $(sinfo --version | awk '{print $2}'), state in $T"
}

# ---------------------------------------------------------------- jobs: submit, wait, check
STUDY=(--model "$T/study/backbone" --tokenizer_path "$T/study/backbone" --source_task_dir "$T/study/tasks"
       --target_task_dir "$T/study/tasks" --tasks babi-qa1 csqa2 --methods lora --source_train_iters 40
       --target_train_iters 40 --valid_interval 5 --log_interval 5 --step_budgets 0 5 --seeds 42
       --scores Loss --inits average --max_output_length 8 --learning_rate 0.01 --progress false)

launcher() {  # launcher OUTPUT_DIR [ENV=VALUE...]: scripts/slurm_study.sh with the test's resources
    local out=$1
    shift
    env PARTITION=debug TIME=00:10:00 CPUS=1 MEM=1G GRES= SOURCE_TASKS=2 TARGET_TASKS=2 REPORT_MEM=1G \
        PYTHON="$PYTHON" "$@" bash scripts/slurm_study.sh "${STUDY[@]}" --output_dir "$out"
}

launch() {  # launch OUTPUT_DIR [ENV=VALUE...]: submit the study; sets SOURCES TARGETS REPORT (job ids), LAUNCH_LOG
    LAUNCH_LOG="$T/log/launch_$(basename "$1")_$(date +%s%N).txt"
    local log=$LAUNCH_LOG
    launcher "$@" > "$log" 2>&1 || { cat "$log" >&2; fail "slurm_study.sh refused to submit"; }
    sed 's/^/    /' "$log"
    SOURCES=$(awk '$1 == "sources" && $2 == "job" {print $3}' "$log")
    TARGETS=$(awk '$1 == "targets" && $2 == "job" {print $3}' "$log")
    REPORT=$(awk '$1 == "report" && $2 == "job" {print $3}' "$log")
    [ -n "$SOURCES" ] && [ -n "$TARGETS" ] && [ -n "$REPORT" ] || fail "no job ids in the launcher's output ($log)"
}

wait_idle() {  # wait_idle: until no job is queued or running except ones that can never start
    local i
    for i in $(seq $((WAIT_S * 2))); do
        [ -z "$(squeue --noheader --format='%i %r' | grep -v DependencyNeverSatisfied)" ] && return 0
        sleep 0.5
    done
    squeue >&2
    fail "jobs still queued or running after $WAIT_S s"
}

wait_settled() {  # wait_settled: until nothing runs and nothing waits but on a dependency
    local i
    for i in $(seq $((WAIT_S * 2))); do
        [ -z "$(squeue --noheader --format='%T %r' | grep -v '^PENDING Dependency')" ] && return 0
        sleep 0.5
    done
    squeue >&2
    fail "jobs still queued or running after $WAIT_S s"
}

states() {  # states JOBID...: "jobid state" lines of sacct, one per array task / job (latest run)
    local ids
    ids=$(IFS=,; echo "$*")
    sacct --noheader --parsable2 --allocations --jobs="$ids" --format=JobID,State
}

expect_completed() {  # expect_completed COUNT JOBID...: sacct has COUNT records, all COMPLETED
    local count=$1 i out
    shift
    for i in $(seq 50); do  # the accounting records reach slurmdbd a moment after the jobs end
        out=$(states "$@")
        [ "$(grep -c . <<< "$out")" = "$count" ] && ! grep -qv '|COMPLETED$' <<< "$out" && break
        sleep 0.2
    done
    sed 's/^/    sacct: /' <<< "$out"
    [ "$(grep -c . <<< "$out")" = "$count" ] || fail "sacct shows $(grep -c . <<< "$out") records of jobs $*, expected $count"
    ! grep -qv '|COMPLETED$' <<< "$out" || fail "not every job of $* COMPLETED (above)"
}

state_of() {  # state_of JOBID: its state in sacct (an array task: ARRAYID_TASK)
    sacct --noheader --parsable2 --allocations --jobs="$1" --format=State | head -n 1
}

wait_file() {  # wait_file GLOB JOBID: until a file matches GLOB (the job must still be running)
    local glob=$1 job=$2 i
    for i in $(seq $((WAIT_S * 20))); do
        compgen -G "$glob" > /dev/null && return 0
        if [ $((i % 40)) = 0 ] && [ "$(state_of "$job")" = COMPLETED ]; then
            fail "$job completed before $glob appeared"
        fi
        sleep 0.05
    done
    fail "no $glob after $WAIT_S s"
}

run_dir() {  # run_dir OUTPUT_DIR STEP_FOLDER TASK: the tuning run folder of TASK under OUTPUT_DIR/lora/STEP_FOLDER
    echo "$1/lora/$2/$3/runs/$3_64_42_lr_0.01_bsz_8"
}

compare() {
    "$PYTHON" tests/slurm/compare_runs.py "$T/runs/reference" "$1" || fail "$1 differs from the unsharded reference"
}

# ---------------------------------------------------------------- the test
started_at=$(date +%s)
say "building the tiny study in $T/study"
"$PYTHON" tests/slurm/make_tiny_study.py "$T/study" > "$T/log/make_tiny_study.txt" 2>&1 \
    || { cat "$T/log/make_tiny_study.txt" >&2; fail "make_tiny_study.py"; }
say "reference: the same study unsharded in one process (in the background while the cluster starts)"
"$PYTHON" run_study.py "${STUDY[@]}" --output_dir "$T/runs/reference" > "$T/log/reference.txt" 2>&1 &
reference_pid=$!
start_cluster
wait "$reference_pid" || { tail -n 20 "$T/log/reference.txt" >&2; fail "the reference run failed"; }
say "reference done"

say "1/2 clean: submit with 2 + 2 shards"
dry=$(launcher "$T/runs/clean" DRY_RUN=1) || fail "the dry run failed: $dry"
[ "$(grep -c '^[A-Z]*=$(sbatch --parsable ' <<< "$dry")" = 3 ] && grep -qF -- '--dependency=afterok:$SOURCES' <<< "$dry" \
    && grep -qF -- '--dependency=afterok:$TARGETS' <<< "$dry" || fail "the dry run did not print three chained sbatch lines: $dry"
[ -z "$(squeue --noheader)" ] && [ ! -e "$T/runs/clean" ] || fail "the dry run submitted or wrote something"
say "the dry run prints three chained sbatch lines and submits nothing"
launch "$T/runs/clean"
wait_idle
expect_completed 5 "$SOURCES" "$TARGETS" "$REPORT"
compare "$T/runs/clean"

say "2/2 killed: a failed submission, then USR1 to a sources task and SIGKILL to a targets task mid-run, then the same command again"
out=$T/runs/killed
# every job of a first submission fails at once (SETUP exits inside a job): its targets and report
# jobs would wait forever; the next submission must cancel both
launch "$out" SETUP='if [ -n "${SLURM_JOB_ID:-}" ]; then exit 3; fi'
failed_sources=$SOURCES failed_targets=$TARGETS failed_report=$REPORT
wait_settled
out_states=$(states "$failed_sources")
grep -q . <<< "$out_states" && ! grep -qv '|FAILED$' <<< "$out_states" \
    || fail "the failing submission's sources tasks did not all fail: $out_states"
say "a failing submission: sources $failed_sources FAILED, targets $failed_targets and report $failed_report wait on it"
launch "$out"
for id in "$failed_targets" "$failed_report"; do
    for i in $(seq 50); do [[ "$(state_of "$id")" == CANCELLED* ]] && break; sleep 0.2; done
    [[ "$(state_of "$id")" == CANCELLED* ]] || fail "the launcher did not cancel job $id of the failed submission: $(state_of "$id")"
done
say "the next submission cancelled the failed one's targets $failed_targets and report $failed_report"
first_report=$REPORT
if launcher "$out" > "$T/log/launch_twice.txt" 2>&1; then
    fail "a second submission while the first is queued was accepted ($T/log/launch_twice.txt)"
fi
grep -q "are still queued or running" "$T/log/launch_twice.txt" \
    || { cat "$T/log/launch_twice.txt" >&2; fail "the second submission failed for another reason"; }
say "a second submission while the first is queued is refused: $(tail -n 1 "$T/log/launch_twice.txt")"
usr1_run=$(run_dir "$out" sources csqa2)  # sources shard 1/2 tunes the second task
wait_file "$usr1_run/resume.safetensors" "${SOURCES}_1"
[ ! -f "$usr1_run/result.json" ] || fail "sources task ${SOURCES}_1 finished its run before USR1 could be sent"
scancel --batch --signal=USR1 "${SOURCES}_1"
say "sent USR1 to ${SOURCES}_1 while $usr1_run was mid-run"
# Slurm lets a requeued job start again only after a delay (BeginTime, about 2 minutes): the test
# does not wait for it, it makes the pending task eligible at once
for i in $(seq $((WAIT_S * 5))); do
    [ "$(squeue --noheader --jobs="${SOURCES}_1" --format=%T 2> /dev/null)" = PENDING ] && break
    sleep 0.2
done
say "${SOURCES}_1 is back in the queue: $(squeue --noheader --jobs="${SOURCES}_1" --format='%T, reason %r, start %S')"
scontrol update JobId="${SOURCES}_1" StartTime=now
kill_run=$(run_dir "$out" targets/random/seed_42 babi-qa1)  # targets shard 0/2 has the first target
wait_file "$kill_run/resume.safetensors" "${TARGETS}_0"
[ ! -f "$kill_run/result.json" ] || fail "targets task ${TARGETS}_0 finished its run before SIGKILL could be sent"
scancel --signal=KILL "${TARGETS}_0"
say "sent SIGKILL to ${TARGETS}_0 while $kill_run was mid-run"
wait_idle
[ ! -f "$kill_run/result.json" ] || fail "$kill_run finished although its job was killed"
expect_completed 2 "$SOURCES"
usr1_log=$(ls "$out"/slurm/*-sources_"${SOURCES}"_1.log)
grep -q "USR1 (time limit near): requeueing" "$usr1_log" || fail "$usr1_log: the task did not requeue itself on USR1"
grep -q "restart 1" "$usr1_log" || fail "$usr1_log: the requeued task did not run again"
grep -q "resuming $usr1_run at update" "$usr1_log" || fail "$usr1_log: the requeued task did not resume its run"
! grep -q "restart 1" "$(ls "$out"/slurm/*-sources_"${SOURCES}"_0.log)" \
    || fail "${SOURCES}_0 was requeued too: USR1 to one array task must requeue that task only"
say "${SOURCES}_1 requeued itself on USR1 and resumed: $(grep -o "resuming .* at update [0-9]*" "$usr1_log" | head -n 1)"
killed_state=$(state_of "${TARGETS}_0")
[ "$killed_state" != COMPLETED ] || fail "${TARGETS}_0 COMPLETED although it was killed"
[ "$(state_of "${TARGETS}_1")" = COMPLETED ] || fail "${TARGETS}_1 (not killed) did not complete"
reason=$(squeue --noheader --jobs="$first_report" --format=%r)
[ "$reason" = DependencyNeverSatisfied ] || fail "report job $first_report: reason '$reason', expected DependencyNeverSatisfied"
say "${TARGETS}_0 ended $killed_state; report job $first_report waits on it forever: resubmitting"
launch "$out"
grep -q "cancelling jobs of an earlier submission that wait on a failed job: $first_report" "$LAUNCH_LOG" \
    || fail "the launcher did not cancel the stale report job $first_report"
wait_idle
expect_completed 5 "$SOURCES" "$TARGETS" "$REPORT"
resumed_log=$(ls "$out"/slurm/*-targets_"${TARGETS}"_0.log)
grep -q "resuming $kill_run at update" "$resumed_log" || fail "$resumed_log: the killed run was not resumed"
say "the resubmitted ${TARGETS}_0: $(grep -o "resuming .* at update [0-9]*" "$resumed_log" | head -n 1)"
compare "$out"

say "passed in $(( $(date +%s) - started_at )) s"
