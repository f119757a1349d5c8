"""Beyond one process: data-parallel replicas on Ray behind one front end, and tensor parallelism.

- `communicator.py`: the collectives a sharded model calls, and the in-process reference group
  (all ranks in one process, in lock step; a test oracle).
- `nccl.py`: the same collectives through NCCL (`cupy.cuda.nccl`) on GPUs.
- `ranks.py`: a rank's share of the model and KV cache; all ranks in this process.
- `tensor_parallel.py`: the runner that drives the ranks; starting them for an engine.
- `ray_ranks.py`: tensor-parallel ranks as Ray actors, one GPU each.
- `replica.py`: one engine replica (an engine thread behind async methods), run as a Ray actor.
- `replica_set.py`: the replicas as the front end holds them: start-up, health, stats.
- `router.py`: which replica takes a request: least outstanding work, with prefix affinity.
- `ray_client.py`: the server's engine client for N replicas: Ray start-up, streams, faults.

Ray is imported only by the modules that need it, and only when a front end asks for more than
one replica (or a Ray address) or for GPU tensor parallelism: the single-process default never
imports it.
"""
