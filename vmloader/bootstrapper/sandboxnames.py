"""Names HTCondor keeps in a job's sandbox for itself, which outputs from a guest never take.

The starter writes them and then trusts them: the wrapper's `condor_chirp` reads
`.chirp.config` to find whom to talk to, and the starter reads the ads and its own
`_condor_stdout`/`_condor_stderr`. A guest that could drop a file of such a name into
the sandbox (an output is copied back by name) would redirect chirp or forge them.
A `vmloader run --output-new` inside an HTCondor job collects into a sandbox too,
so collection refuses these names everywhere.
"""
from pathlib import PurePosixPath

# vmloader's own: the wrapper's pointer to the job's VM, which `condor_ssh_to_job` follows (sshtojob.py).
VMLOADER_POINTER = ".vmloader-job"
RESERVED = frozenset((".chirp.config", ".job.ad", ".machine.ad", ".update.ad", ".condor_creds", VMLOADER_POINTER))
RESERVED_PREFIX = "_condor_"
REFUSAL = ("HTCondor reserves this name in a job's sandbox (.chirp.config, .job.ad, .machine.ad, .update.ad, "
           ".condor_creds, _condor_*; and vmloader's .vmloader-job); not copied back")


def reserved(output: str) -> bool:
    """Whether an output path would write (or write into) a name HTCondor reserves at the sandbox's top."""
    parts = PurePosixPath(output).parts
    top = parts[0] if parts else ""
    return top in RESERVED or top.startswith(RESERVED_PREFIX)
