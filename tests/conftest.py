"""Shared tiny fixtures (keep minimal)."""
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """Connectome cache in a temporary directory (never ~/.cache), one torch
    thread here and in subprocesses (two threads on a loaded 2-core box ran
    70x slower), headless matplotlib."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DMN_NEURO_CACHE", str(tmp_path_factory.mktemp("dmn_cache")))
    mp.setenv("OMP_NUM_THREADS", "1")
    mp.setenv("MPLBACKEND", "Agg")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="session")
def flywire_circuit(tmp_path_factory):
    """The bundled FlyWire v783 circuit with all fast layers (ORN, PN, KC, APL, MBON, DN)."""
    from connectome.fetch_data import FlyWireConnectome

    fetcher = FlyWireConnectome(cache_dir=tmp_path_factory.mktemp("dmn_cache"))
    return fetcher.fetch_olfactory_circuit(include_layers=["ORN", "PN", "KC", "APL", "MBON", "DN"])
