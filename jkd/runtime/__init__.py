"""What every job stands on, beneath the library's floors: faults of the machine told plainly
(``faults``), the one atomic write (``atomic``), the processes of a run (``hosts``), a run folder
with its guard, lock and log (``run_folder``, ``run_lock``) and the fingerprints of its inputs
(``fingerprint``). Nothing here imports the models, the data, the steps or the jobs.
"""
