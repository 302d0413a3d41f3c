"""Imported first in every reward-worker process (and in the forkserver they are forked from, as a preload):
the signals that stop or preempt a run are the trainer's to act on. Ctrl-C goes to the whole process
group, and Slurm sends USR1/TERM to every process of a job step; by default they would kill the workers
mid-batch. The trainer (rlhf/preempt.py) finishes its step and stops the workers itself.

Importing this module is what it does: never import it in the trainer.
"""

import signal

for _sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM):
    signal.signal(_sig, signal.SIG_IGN)
