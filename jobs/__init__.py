"""Slurm jobs through submitit: the only package that knows Slurm or submitit.

    executor.py  ClusterConfig -> validated submitit executor (slurm, local or debug)
    tasks.py     the callables jobs run: TrainJob (Checkpointable, requeues), PrepareJob, CommandJob
    submit.py    `hpcforge submit`: one job or a prepare -> train (-> evaluate) chain (afterok)
    sweep.py     `hpcforge sweep`: grid/list of overrides -> one job array + a summary job
    records.py   job.json next to the logs; state (sacct), results and logs for status/logs/cancel
"""
