"""Tracking a run: the W&B mode, the run's environment, the report tables and paired SelfReg/baseline comparisons.

``wandb_mode``: what W&B will do (online, offline, disabled) decided before a run starts; ``environment``: the
machine, versions and git state logged with a run; ``report``: the tables of a run and of a comparison;
``compare``: pairing SelfReg and baseline runs by seed into a comparison summary; ``csv_logger``: every logged
scalar in the run folder's ``metrics.csv``, appended (never truncated) on resume.
"""
