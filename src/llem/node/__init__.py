"""What runs on a compute node, in flow order.

``hooks`` (Prolog/Epilog glue) -> ``slurm`` (the job from Slurm's environment) and ``usage``
(its cgroup or processes) -> ``jobs`` (registrations, job lifecycle) -> ``daemon`` (the node
sampler: sensors, ``attribution``, ``windows`` server) -> ``store`` (all node SQL) ->
``export`` (job and node slices) -> ``outbox`` (bounded delivery to the spool).
"""
