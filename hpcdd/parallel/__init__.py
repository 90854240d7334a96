"""The parallel (MPI) plumbing: the world of ranks and its groups (``world``), how a launcher started
them (``launcher``), which rank owns which subdomains (``ownership``), the collectives the phases use
(``collectives``), devices and threads (``device``), preemption, failures and stuck peers
(``preemption``, ``failures``, ``watchdog``). mpi4py is imported only where a world is made."""
