# Sourced (bash) by train.sbatch and sample.sbatch: run one command in the background of the batch
# shell, pass Slurm's warning signal on to it, and requeue the job when the warning came.
#
# Slurm sends the warning (`#SBATCH --signal=B:USR1@120`) to the batch shell only ("B:"): bash runs a
# trap only between commands, so the command runs in the background and the shell waits for it.
#
# run_requeueable STOP_SIGNAL COMMAND...
#   USR1 (the time-limit warning): send STOP_SIGNAL to COMMAND (srun passes signals on to every task)
#     and wait for it. If it stopped for the signal (exit status 128 + signal: image_train saves its
#     checkpoint set first; a sampler killed mid-way leaves only whole images), `scontrol requeue
#     $SLURM_JOB_ID` and return 0; the requeued job reruns the script and continues where this one
#     stopped. Exit 0 (the work was done anyway), 1 (training diverged) or 2 (a user error) is not
#     requeued: the last two would fail the same way again.
#   TERM (scancel, or preemption with a grace time): passed on as TERM, no requeue (a site whose
#     PreemptMode is REQUEUE requeues preempted jobs itself).
# Otherwise returns COMMAND's exit status. SCONTROL overrides the scontrol command (the tests use a stand-in).

scdm_on_signal() {
    echo "scdm: $(date '+%F %T') SIG$1 to job ${SLURM_JOB_ID:-?}: sending SIG$2 to the running step" >&2
    if [ "$1" = USR1 ]; then scdm_warned=1; fi
    if [ -n "${scdm_child:-}" ]; then kill -s "$2" "$scdm_child" 2>/dev/null || true; else scdm_pending=$2; fi
}

run_requeueable() {
    stop_signal=$1; shift
    scdm_warned=0; scdm_child=""; scdm_pending=""
    trap 'scdm_on_signal USR1 "$stop_signal"' USR1
    trap 'scdm_on_signal TERM TERM' TERM
    "$@" &
    scdm_child=$!
    # A signal between the start of the step and the line above found no step to pass it on to.
    if [ -n "$scdm_pending" ]; then kill -s "$scdm_pending" "$scdm_child" 2>/dev/null || true; fi
    # A trap interrupts `wait`; wait again until the command has ended, then read its status (bash
    # keeps it). Written so that `set -e` in the caller does not end the shell on a failed step.
    while kill -0 "$scdm_child" 2>/dev/null; do wait "$scdm_child" || true; done
    status=0; wait "$scdm_child" || status=$?
    trap - USR1 TERM
    if [ "$scdm_warned" = 1 ] && [ "$status" -gt 128 ]; then
        echo "scdm: the step stopped for the signal (exit status $status): requeueing job" \
            "${SLURM_JOB_ID:-?}; the next run continues where it stopped" >&2
        ${SCONTROL:-scontrol} requeue "$SLURM_JOB_ID" || return $?
        return 0
    fi
    return "$status"
}
