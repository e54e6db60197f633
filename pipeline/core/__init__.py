"""The job lifecycle: creating and dispatching jobs, taking results into the inbox and saving them,
counting outcomes exactly once, failing lost and unsaved images, and the reconciler that drives every job
to one terminal state. Every job-state change goes through these modules, whichever door asked for it.
"""
