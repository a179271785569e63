"""Outputs never take a name HTCondor keeps in the sandbox for itself."""
import pytest

from vmloader.bootstrapper.sandboxnames import reserved


@pytest.mark.parametrize("name", [".chirp.config", ".job.ad", ".machine.ad", ".update.ad", "_condor_stdout",
                                  "_condor_stderr", "_condor_anything", ".condor_creds/token",
                                  "_condor_stdout/x", "./.chirp.config"])
def test_htcondors_names_are_reserved(name):
    assert reserved(name)


@pytest.mark.parametrize("name", ["result.txt", ".chirp.config.bak", "x.job.ad", "sub/.chirp.config",
                                  "sub/_condor_stdout", "condor_stdout", ".chirp", "_condo_x"])
def test_other_names_are_not(name):
    assert not reserved(name)
